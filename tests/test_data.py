"""Data: partitions, the offline datasets, and the real torchvision readers on
tiny files written in each dataset's real on-disk format (no network)."""

from __future__ import annotations

import json
import pickle
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from sfprompt_mpi.config import DataConfig
from sfprompt_mpi.data import (SCHEMES, FedData, build_data, dataset_labels, label_skew,
                               partition_indices, prepare_dataset)
from sfprompt_mpi.data import datasets as ds_mod
from sfprompt_mpi.errors import UserError

SIZE = 16  # small model input size: keeps every test fast


def _pixels(image_CHW: torch.Tensor) -> np.ndarray:
    """Per-channel mean of a normalised image, back in 0..255."""
    return ((image_CHW.mean(dim=(1, 2)) * 0.5 + 0.5) * 255).numpy()


def _balanced_labels(classes: int = 10, per_class: int = 100, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


# --- partitions ------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("clients", [1, 7, 20])
def test_partition_assigns_every_sample_exactly_once(scheme, clients):
    labels = np.random.default_rng(1).integers(0, 10, size=997)  # unbalanced, odd size

    parts = partition_indices(labels, clients, scheme, alpha=0.3, shards_per_client=2, seed=3)

    assert len(parts) == clients
    assert all(p.dtype == np.int64 and len(p) > 0 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_is_a_function_of_the_seed(scheme):
    labels = _balanced_labels()

    first = partition_indices(labels, 8, scheme, seed=5)
    again = partition_indices(labels, 8, scheme, seed=5)
    other = partition_indices(labels, 8, scheme, seed=6)

    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_iid_sizes_differ_by_at_most_one():
    parts = partition_indices(_balanced_labels(), 7, "iid", seed=0)

    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _balanced_labels()

    skew = {a: label_skew(labels, partition_indices(labels, 10, "dirichlet", alpha=a, seed=0))
            for a in (100.0, 1.0, 0.1)}
    iid = label_skew(labels, partition_indices(labels, 10, "iid", seed=0))

    assert iid < 0.15
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[0.1] > 0.5


def test_dirichlet_gives_every_client_a_sample_even_at_tiny_alpha():
    labels = _balanced_labels(classes=10, per_class=10)

    parts = partition_indices(labels, 60, "dirichlet", alpha=0.01, seed=0)

    assert min(len(p) for p in parts) >= 1
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(100))


def test_shards_limit_the_labels_per_client():
    labels = _balanced_labels(classes=10, per_class=100)

    # 40 shards of 25 samples: each shard lies inside one class
    parts = partition_indices(labels, 20, "shards", shards_per_client=2, seed=0)

    assert all(len(p) == 50 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)


def test_shards_on_uneven_classes_stay_within_two_labels_per_shard():
    labels = np.random.default_rng(2).integers(0, 10, size=1000)

    parts = partition_indices(labels, 10, "shards", shards_per_client=3, seed=0)

    # shards (~33 samples) are smaller than every class, so each spans <= 2 labels
    assert all(len(np.unique(labels[p])) <= 2 * 3 for p in parts)


def test_label_skew_on_a_hand_example():
    labels = np.array([0, 0, 1, 1])

    assert label_skew(labels, [np.arange(4)]) == 0.0
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(0.5)


@pytest.mark.parametrize("args, match", [
    (dict(num_clients=11, scheme="iid"), "11 clients but only 10"),
    (dict(num_clients=11, scheme="dirichlet"), "11 clients but only 10"),
    (dict(num_clients=0, scheme="iid"), "must be >= 1"),
    (dict(num_clients=2, scheme="random"), "unknown partition scheme"),
    (dict(num_clients=4, scheme="shards", shards_per_client=3), "at least clients\\*shards_per_client"),
])
def test_partition_rejects_impossible_requests(args, match):
    with pytest.raises(UserError, match=match):
        partition_indices(np.arange(10) % 3, **args)


# --- offline datasets ---------------------------------------------------------

def test_digits_shapes_classes_and_range():
    start = time.perf_counter()
    data = build_data(DataConfig(dataset="digits"), image_size=32, seed=0)
    elapsed = time.perf_counter() - start

    assert isinstance(data, FedData) and data.num_classes == 10
    assert len(data.train) + len(data.test) == 1797
    assert abs(len(data.test) - 0.2 * 1797) < 15
    assert data.train_labels.dtype == np.int64 and len(data.train_labels) == len(data.train)
    assert set(np.unique(data.train_labels)) == set(range(10))
    image, label = data.train[3]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert isinstance(label, int) and label == data.train_labels[3]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grayscale -> 3 channels
    everything = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert everything.min() >= -1.0 and everything.max() <= 1.0 and everything.std() > 0.3
    assert elapsed < 1.0


def test_digits_split_does_not_move_with_the_run_seed():
    a = build_data(DataConfig(dataset="digits"), 8, seed=0)
    b = build_data(DataConfig(dataset="digits"), 8, seed=1)

    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    assert torch.equal(a.test[10][0], b.test[10][0])


def test_large_in_memory_sets_render_on_access_with_the_same_result(monkeypatch):
    cached = build_data(DataConfig(dataset="digits"), 24, seed=0)
    monkeypatch.setattr(ds_mod, "_CACHE_BYTES", 0)

    lazy = build_data(DataConfig(dataset="digits"), 24, seed=0)

    assert lazy.train._cache is None and cached.train._cache is not None
    for i in (0, 7, len(lazy.train) - 1):
        torch.testing.assert_close(lazy.train[i][0], cached.train[i][0], rtol=0, atol=1e-6)


def test_synthetic_is_seeded_and_learnable():
    cfg = DataConfig(dataset="synthetic", synthetic_samples=200, synthetic_classes=5)

    data = build_data(cfg, SIZE, seed=0)
    again = build_data(cfg, SIZE, seed=0)
    other = build_data(cfg, SIZE, seed=1)

    assert data.num_classes == 5 and len(data.train) == 200 and len(data.test) == 50
    assert np.bincount(data.train_labels).tolist() == [40] * 5
    assert torch.equal(data.train[0][0], again.train[0][0])
    assert not torch.equal(data.train[0][0], other.train[0][0])
    # nearest class mean: far above the 20% of chance
    x_train = torch.stack([data.train[i][0] for i in range(len(data.train))]).flatten(1)
    x_test = torch.stack([data.test[i][0] for i in range(len(data.test))]).flatten(1)
    y_test = torch.tensor([data.test[i][1] for i in range(len(data.test))])
    means = torch.stack([x_train[torch.from_numpy(data.train_labels == c)].mean(0) for c in range(5)])
    accuracy = (torch.cdist(x_test, means).argmin(1) == y_test).float().mean()
    assert accuracy > 0.8


def test_max_samples_keep_a_seeded_subset_with_matching_labels():
    cfg = DataConfig(dataset="digits", max_train_samples=100, max_test_samples=30)

    data = build_data(cfg, 8, seed=0)
    again = build_data(cfg, 8, seed=0)
    other = build_data(cfg, 8, seed=1)

    assert len(data.train) == 100 and len(data.test) == 30 and len(data.train_labels) == 100
    assert [data.train[i][1] for i in range(100)] == data.train_labels.tolist()
    np.testing.assert_array_equal(data.train_labels, again.train_labels)
    assert data.train.indices != other.train.indices


def test_unknown_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        build_data(DataConfig(dataset="mnist", data_dir=str(tmp_path)), SIZE, seed=0)
    with pytest.raises(UserError, match="unknown dataset"):
        prepare_dataset(DataConfig(dataset="mnist", download=True))


# --- tiny files in the real on-disk formats ----------------------------------

def _cifar_rows(labels: list[int]) -> np.ndarray:
    """CIFAR rows are 1024 R, 1024 G, 1024 B bytes; R encodes the label."""
    rows = np.empty((len(labels), 3, 1024), np.uint8)
    rows[:, 0] = (np.array(labels) * 2)[:, None]
    rows[:, 1], rows[:, 2] = 100, 200
    return rows.reshape(len(labels), 3072)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


@pytest.fixture
def cifar10_dir(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for b in range(1, 6):
        labels = [(3 * b + i) % 10 for i in range(4)]
        _pickle(folder / f"data_batch_{b}", {"batch_label": f"batch {b}", "labels": labels,
                                              "data": _cifar_rows(labels), "filenames": [""] * 4})
    _pickle(folder / "test_batch", {"labels": [9, 0, 5], "data": _cifar_rows([9, 0, 5])})
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072})
    return tmp_path


@pytest.fixture
def cifar100_dir(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train, test = [0, 57, 99, 12, 57, 3], [99, 1]
    _pickle(folder / "train", {"fine_labels": train, "coarse_labels": [0] * 6, "data": _cifar_rows(train)})
    _pickle(folder / "test", {"fine_labels": test, "coarse_labels": [0] * 2, "data": _cifar_rows(test)})
    _pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                              "coarse_label_names": [f"c{i}" for i in range(20)]})
    return tmp_path


def _svhn_mat(path: Path, digits: list[int]) -> None:
    x = np.zeros((32, 32, 3, len(digits)), np.uint8)  # SVHN stores H x W x C x N
    x[:, :, 0, :] = np.array(digits) * 20
    x[:, :, 1, :] = 100
    y = np.array([[10 if d == 0 else d] for d in digits], np.uint8)  # SVHN writes digit 0 as 10
    scipy.io.savemat(path, {"X": x, "y": y})


def _jpeg(path: Path, red: int, size=(20, 14), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = red if mode == "L" else (red, 100, 200)
    Image.new(mode, size, color).save(path, quality=95)


def test_cifar10_reads_real_python_batches(cifar10_dir):
    data = build_data(DataConfig(dataset="cifar10", data_dir=str(cifar10_dir)), SIZE, seed=0)

    assert data.num_classes == 10 and len(data.train) == 20 and len(data.test) == 3
    assert data.train_labels.tolist()[:4] == [3, 4, 5, 6]
    for i in (0, 7, 19):
        image, label = data.train[i]
        assert image.shape == (3, SIZE, SIZE) and label == data.train_labels[i]
        np.testing.assert_allclose(_pixels(image), [2 * label, 100, 200], atol=0.5)
    assert [data.test[i][1] for i in range(3)] == [9, 0, 5]


def test_cifar100_reads_fine_labels(cifar100_dir):
    data = build_data(DataConfig(dataset="cifar100", data_dir=str(cifar100_dir)), SIZE, seed=0)

    assert data.num_classes == 100
    assert data.train_labels.tolist() == [0, 57, 99, 12, 57, 3]
    image, label = data.test[0]
    assert label == 99 and image.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(_pixels(image), [198, 100, 200], atol=0.5)


def test_svhn_reads_mat_files_and_maps_ten_to_zero(tmp_path):
    (tmp_path / "svhn").mkdir()
    _svhn_mat(tmp_path / "svhn" / "train_32x32.mat", [1, 0, 9, 4, 0])
    _svhn_mat(tmp_path / "svhn" / "test_32x32.mat", [7, 0])

    data = build_data(DataConfig(dataset="svhn", data_dir=str(tmp_path)), SIZE, seed=0)

    assert data.num_classes == 10 and data.train_labels.tolist() == [1, 0, 9, 4, 0]
    image, label = data.train[2]
    assert label == 9 and image.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(_pixels(image), [180, 100, 0], atol=0.5)
    assert [data.test[i][1] for i in range(2)] == [7, 0]


def test_flowers102_trains_on_train_plus_val(tmp_path):
    base = tmp_path / "flowers-102"
    labels = [1, 5, 102, 5, 1, 30, 102, 7]  # 1-based, as in imagelabels.mat
    for image_id, label in enumerate(labels, start=1):
        _jpeg(base / "jpg" / f"image_{image_id:05d}.jpg", 2 * label, size=(24, 16))
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels], np.uint8)})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4, 5]]),
                                          "tstid": np.array([[6, 7, 8]])})

    data = build_data(DataConfig(dataset="flowers102", data_dir=str(tmp_path)), SIZE, seed=0)

    assert data.num_classes == 102
    assert data.train_labels.tolist() == [0, 4, 101, 4, 0]
    image, label = data.train[2]
    assert label == 101 and image.shape == (3, SIZE, SIZE)  # 24x16 resized and centre-cropped
    np.testing.assert_allclose(_pixels(image), [204, 100, 200], atol=4)
    assert [data.test[i][1] for i in range(3)] == [29, 101, 6]


def test_caltech101_seeded_split_and_grayscale_images(tmp_path):
    root = tmp_path / "caltech101" / "101_ObjectCategories"
    # sorted order without BACKGROUND_Google: Faces=0, accordion=1, airplanes=2
    for cls_name, red in (("BACKGROUND_Google", 250), ("Faces", 40), ("accordion", 80), ("airplanes", 120)):
        for i in range(1, 6):
            _jpeg(root / cls_name / f"image_{i:04d}.jpg", red, mode="L" if cls_name == "Faces" else "RGB")

    data = build_data(DataConfig(dataset="caltech101", data_dir=str(tmp_path)), SIZE, seed=0)
    again = build_data(DataConfig(dataset="caltech101", data_dir=str(tmp_path)), SIZE, seed=3)

    assert data.num_classes == 101
    assert len(data.train) == 12 and len(data.test) == 3  # 4 + 1 per class
    assert np.bincount(data.train_labels).tolist() == [4, 4, 4]
    assert data.train.indices == again.train.indices  # fixed split, whatever the run seed
    assert not set(data.train.indices) & set(data.test.indices)
    for i in range(len(data.train)):
        image, label = data.train[i]
        expected = [40, 40, 40] if label == 0 else [40 * (label + 1), 100, 200]
        assert image.shape == (3, SIZE, SIZE)
        np.testing.assert_allclose(_pixels(image), expected, atol=4)


def test_food101_reads_json_meta(tmp_path):
    base = tmp_path / "food-101"
    train = {"apple_pie": ["apple_pie/101", "apple_pie/102"], "baby_back_ribs": ["baby_back_ribs/7"]}
    test = {"apple_pie": ["apple_pie/5"], "baby_back_ribs": ["baby_back_ribs/9", "baby_back_ribs/8"]}
    (base / "meta").mkdir(parents=True)
    for split, meta in (("train", train), ("test", test)):
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        for cls_index, paths in enumerate(meta.values()):
            for rel in paths:
                _jpeg(base / "images" / f"{rel}.jpg", 60 + 100 * cls_index)

    data = build_data(DataConfig(dataset="food101", data_dir=str(tmp_path)), SIZE, seed=0)

    assert data.num_classes == 101 and data.train_labels.tolist() == [0, 0, 1]
    image, label = data.train[2]
    assert label == 1 and image.shape == (3, SIZE, SIZE)
    np.testing.assert_allclose(_pixels(image), [160, 100, 200], atol=4)
    assert dataset_labels(data.test).tolist() == [0, 1, 1]


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "svhn"),
    ("flowers102", "flowers-102"), ("caltech101", "caltech101"), ("food101", "food-101"),
])
def test_missing_files_name_the_dataset_and_download(tmp_path, name, expected):
    with pytest.raises(UserError) as info:
        build_data(DataConfig(dataset=name, data_dir=str(tmp_path)), SIZE, seed=0)

    message = str(info.value)
    assert f"dataset {name} not found under {tmp_path}" in message
    assert f"(expected {tmp_path / expected})" in message and "--download" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # looking created nothing


def test_a_missing_file_is_named(cifar10_dir):
    (cifar10_dir / "cifar-10-batches-py" / "test_batch").unlink()

    with pytest.raises(UserError, match="expected .*test_batch\\); pass --download"):
        build_data(DataConfig(dataset="cifar10", data_dir=str(cifar10_dir)), SIZE, seed=0)


def test_a_corrupt_file_is_a_user_error(cifar10_dir):
    (cifar10_dir / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")

    with pytest.raises(UserError, match="dataset cifar10 under .* could not be read"):
        build_data(DataConfig(dataset="cifar10", data_dir=str(cifar10_dir)), SIZE, seed=0)


def test_prepare_without_download_touches_nothing(tmp_path):
    prepare_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path / "absent")))
    prepare_dataset(DataConfig(dataset="digits", data_dir=str(tmp_path / "absent"), download=True))

    assert not (tmp_path / "absent").exists()


def test_a_failed_download_is_a_user_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)

    with pytest.raises(UserError, match="downloading dataset cifar10 into .* failed .*unreachable"):
        prepare_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=True))
