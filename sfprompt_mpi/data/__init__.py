"""Datasets and their federated partitions (pure functions of labels and seed)."""

from .datasets import FedData, TensorImages, build_data, build_transform, dataset_labels, prepare_dataset
from .partition import SCHEMES, label_skew, partition_indices

__all__ = ["FedData", "TensorImages", "build_data", "build_transform", "dataset_labels", "prepare_dataset",
           "SCHEMES", "label_skew", "partition_indices"]
