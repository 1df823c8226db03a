"""Datasets as (image, label) pairs sized for the model, plus their labels.

Two offline datasets need no files at all: ``digits`` (scikit-learn's bundled
8x8 handwritten digits) and ``synthetic`` (seeded class patterns plus noise).
Both live in memory and build in well under a second, so tests and laptop
runs never wait on I/O.

The image datasets (CIFAR-10/100, SVHN, Flowers102, Caltech101, Food101) are
read by the real torchvision classes from their real on-disk layouts under
``data_dir``. Only :func:`prepare_dataset` downloads, and only when asked;
rank 0 calls it once before any rank calls :func:`build_data`.

Every image comes back as a float tensor ``3 x S x S`` normalised with mean
and std 0.5 (values in [-1, 1]); grayscale images are repeated to 3
channels. No augmentation is applied, so a sample is the same tensor on
every rank and in every epoch.

Seeds: a dataset's own train/test split (digits, Caltech101) uses a fixed
seed so that runs with different ``--seed`` are scored on the same test set,
like datasets with an official split. The run seed picks the
``max_*_samples`` subsets and generates the synthetic data.
"""

from __future__ import annotations

import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset
from torchvision import datasets as tvd
from torchvision import transforms as T

from ..config import DATASETS, DataConfig
from ..errors import UserError

MEAN = STD = (0.5, 0.5, 0.5)
_SPLIT_SEED = 0          # fixed: a dataset's test set must not move with --seed
_TEST_FRACTION = 0.2     # digits and Caltech101 have no official split
_CACHE_BYTES = 256 << 20  # render in-memory datasets ahead of time below this size
_STREAM_SPLIT, _STREAM_TRAIN_SUBSET, _STREAM_TEST_SUBSET, _STREAM_SYNTH = range(4)


@dataclass
class FedData:
    """What the federated runtime needs from a dataset.

    ``train_labels[i]`` is the label of ``train[i]`` (int64), available
    without decoding any image, so partitions are cheap on every rank.
    """

    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    num_classes: int


class TensorImages(Dataset):
    """Small images held in memory, served upscaled and normalised.

    ``images`` are float ``N x C x h x w`` in [0, 1] with C = 1 or 3. An item
    is rendered (resized, normalised) on first access and kept when the whole
    rendered set would fit in a few hundred MiB; otherwise (e.g. digits at
    224 px) it is rendered on every access, with the same result. The cache
    is reserved, not filled, up front: its pages become resident only for
    the items a rank touches, so a client rank that reads only its own shard
    holds only that shard's rendered images.
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, image_size: int) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_size = image_size
        self._small = images.float().contiguous()
        rendered_bytes = len(images) * 3 * image_size * image_size * 4
        cached = rendered_bytes <= _CACHE_BYTES
        self._cache = torch.empty(len(images), 3, image_size, image_size) if cached else None
        self._filled = np.zeros(len(images), dtype=bool) if cached else None

    def _render(self, x_NChw: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if x_NChw.shape[-2:] != (s, s):
            x_NChw = F.interpolate(x_NChw, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        if x_NChw.shape[1] == 1:
            x_NChw = x_NChw.expand(-1, 3, -1, -1)
        return ((x_NChw - 0.5) / 0.5).contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._cache is None:
            return self._render(self._small[index:index + 1])[0], int(self.labels[index])
        if not self._filled[index]:
            self._cache[index] = self._render(self._small[index:index + 1])[0]
            self._filled[index] = True
        return self._cache[index], int(self.labels[index])


# --- torchvision classes that trust files already on disk -------------------
# torchvision checks every file's md5 before loading. The md5 is verified
# when torchvision downloads (prepare_dataset uses the stock classes), so at
# load time these subclasses only check that the files exist and let the
# stock parsers read them: a corrupt file still fails, as a read error.
# This also lets the tests feed tiny files in the real formats.

class _NoMd5CIFAR:
    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _CIFAR10Files(_NoMd5CIFAR, tvd.CIFAR10):
    pass


class _CIFAR100Files(_NoMd5CIFAR, tvd.CIFAR100):
    pass


class _SVHNFiles(tvd.SVHN):
    def _check_integrity(self) -> bool:
        return (Path(self.root) / self.filename).is_file()


class _Flowers102Files(tvd.Flowers102):
    def _check_integrity(self) -> bool:
        return self._images_folder.is_dir() and all(
            (self._base_folder / self._file_dict[key][0]).is_file() for key in ("label", "setid"))


# --- the file-backed datasets ------------------------------------------------

def _to_rgb(image):
    # Caltech101 has grayscale images and the model wants 3 channels; a
    # module-level function (not a lambda) keeps the transform picklable
    # for DataLoader worker processes.
    return image if image.mode == "RGB" else image.convert("RGB")


def build_transform(image_size: int) -> Callable:
    """PIL image -> normalised ``3 x S x S`` tensor: shorter side resized to
    ``image_size``, then a centre crop, so aspect ratios are kept."""
    return T.Compose([
        _to_rgb,
        T.Resize(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def _load_cifar(cls):
    def load(root: Path, tf: Callable) -> tuple[Dataset, Dataset]:
        return cls(root, train=True, transform=tf), cls(root, train=False, transform=tf)
    return load


def _load_svhn(root: Path, tf: Callable) -> tuple[Dataset, Dataset]:
    return _SVHNFiles(root / "svhn", split="train", transform=tf), _SVHNFiles(root / "svhn", split="test", transform=tf)


def _load_flowers102(root: Path, tf: Callable) -> tuple[Dataset, Dataset]:
    # The official train split has only 10 images per class; train+val (20
    # per class) is the usual training set when no validation is needed.
    train = ConcatDataset([_Flowers102Files(root, split=s, transform=tf) for s in ("train", "val")])
    return train, _Flowers102Files(root, split="test", transform=tf)


def _load_caltech101(root: Path, tf: Callable) -> tuple[Dataset, Dataset]:
    full = tvd.Caltech101(root, transform=tf)
    train_idx, test_idx = _stratified_split(np.asarray(full.y, dtype=np.int64), _TEST_FRACTION, _SPLIT_SEED)
    return Subset(full, train_idx.tolist()), Subset(full, test_idx.tolist())


def _load_food101(root: Path, tf: Callable) -> tuple[Dataset, Dataset]:
    return tvd.Food101(root, split="train", transform=tf), tvd.Food101(root, split="test", transform=tf)


def _download_cifar(cls):
    return lambda root: cls(root, train=True, download=True)


def _download_svhn(root: Path) -> None:
    for split in ("train", "test"):
        tvd.SVHN(root / "svhn", split=split, download=True)


@dataclass(frozen=True)
class _FileSpec:
    num_classes: int
    required: tuple[str, ...]  # relative to data_dir; the base folder first
    load: Callable[[Path, Callable], tuple[Dataset, Dataset]]
    download: Callable[[Path], object]


_CIFAR10_FILES = tuple(f"cifar-10-batches-py/{n}" for n, _ in tvd.CIFAR10.train_list + tvd.CIFAR10.test_list)
_CIFAR100_FILES = tuple(f"cifar-100-python/{n}" for n, _ in tvd.CIFAR100.train_list + tvd.CIFAR100.test_list)

_FILE_DATASETS: dict[str, _FileSpec] = {
    "cifar10": _FileSpec(10, ("cifar-10-batches-py", *_CIFAR10_FILES, "cifar-10-batches-py/batches.meta"),
                         _load_cifar(_CIFAR10Files), _download_cifar(tvd.CIFAR10)),
    "cifar100": _FileSpec(100, ("cifar-100-python", *_CIFAR100_FILES, "cifar-100-python/meta"),
                          _load_cifar(_CIFAR100Files), _download_cifar(tvd.CIFAR100)),
    "svhn": _FileSpec(10, ("svhn", "svhn/train_32x32.mat", "svhn/test_32x32.mat"), _load_svhn, _download_svhn),
    "flowers102": _FileSpec(102, ("flowers-102", "flowers-102/jpg", "flowers-102/imagelabels.mat",
                                  "flowers-102/setid.mat"),
                            _load_flowers102, lambda root: tvd.Flowers102(root, split="train", download=True)),
    "caltech101": _FileSpec(101, ("caltech101", "caltech101/101_ObjectCategories"),
                            _load_caltech101, lambda root: tvd.Caltech101(root, download=True)),
    "food101": _FileSpec(101, ("food-101", "food-101/meta/train.json", "food-101/meta/test.json",
                               "food-101/images"),
                         _load_food101, lambda root: tvd.Food101(root, split="train", download=True)),
}

OFFLINE_DATASETS = ("digits", "synthetic")
if set(DATASETS) != {*OFFLINE_DATASETS, *_FILE_DATASETS}:
    raise RuntimeError("config.DATASETS and the dataset table disagree")


def prepare_dataset(cfg: DataConfig) -> None:
    """Download ``cfg.dataset`` into ``cfg.data_dir`` if ``cfg.download``.

    Uses the stock torchvision classes, which verify md5 sums and skip files
    already present and intact. Call it on one rank only, before any rank
    calls :func:`build_data`. A no-op without ``download`` and for the
    offline datasets.
    """
    name = cfg.dataset
    if name not in OFFLINE_DATASETS and name not in _FILE_DATASETS:
        raise _unknown(name)
    if not cfg.download or name in OFFLINE_DATASETS:
        return
    root = Path(cfg.data_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _FILE_DATASETS[name].download(root)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        raise UserError(f"downloading dataset {name} into {root} failed ({_one_line(exc)}); "
                        "check network access or put the files there by hand") from None


def build_data(cfg: DataConfig, image_size: int, seed: int) -> FedData:
    """Train and test sets of ``cfg.dataset`` at ``image_size`` pixels; never downloads.

    ``max_train_samples`` / ``max_test_samples`` (0: all) keep a random
    subset chosen by ``seed``. Raises :class:`UserError` for an unknown
    dataset, missing files (naming the expected path and ``--download``) or
    files that cannot be parsed.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    name = cfg.dataset
    if name == "digits":
        train, test, num_classes = _digits(image_size)
    elif name == "synthetic":
        train, test = _synthetic(cfg.synthetic_samples, cfg.synthetic_classes, image_size, seed)
        num_classes = cfg.synthetic_classes
    elif name in _FILE_DATASETS:
        spec = _FILE_DATASETS[name]
        train, test = _load_files(name, spec, Path(cfg.data_dir), image_size)
        num_classes = spec.num_classes
    else:
        raise _unknown(name)

    train, train_labels = _limit(train, cfg.max_train_samples, seed, _STREAM_TRAIN_SUBSET)
    test, test_labels = _limit(test, cfg.max_test_samples, seed, _STREAM_TEST_SUBSET)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if len(labels) == 0:
            raise UserError(f"dataset {name} under {cfg.data_dir} has no {split} samples; check its files")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"dataset {name} under {cfg.data_dir} has {split} labels outside 0..{num_classes - 1}; "
                            "its files are not the expected dataset")
    return FedData(train=train, test=test, train_labels=train_labels, num_classes=num_classes)


def dataset_labels(ds: Dataset) -> np.ndarray:
    """Labels of ``ds`` as int64, read from the dataset's label list rather
    than by decoding images (works through Subset and ConcatDataset)."""
    if isinstance(ds, Subset):
        return dataset_labels(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
    if isinstance(ds, ConcatDataset):
        return np.concatenate([dataset_labels(d) for d in ds.datasets])
    # CIFAR: targets; SVHN and TensorImages: labels; Flowers102, Food101: _labels; Caltech101: y
    for attr in ("targets", "labels", "_labels", "y"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), dtype=np.int64).reshape(-1)
    raise TypeError(f"cannot read labels of {type(ds).__name__} without decoding it")


#: Training-set sizes of the file datasets as torchvision ships them (for plans, before loading).
NOMINAL_TRAIN_SIZES = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257, "flowers102": 2040,
                       "caltech101": 6941, "food101": 75750}


def check_dataset_files(cfg: DataConfig) -> tuple[int, int]:
    """Check the dataset's files exist without reading them; -> (train samples, classes).

    File datasets report their nominal training-set size (before ``max_train_samples``).
    """
    name = cfg.dataset
    if name == "digits":
        n, k = len(_stratified_split(_load_digits_arrays()[1], _TEST_FRACTION, _SPLIT_SEED)[0]), 10
    elif name == "synthetic":
        n, k = cfg.synthetic_samples, cfg.synthetic_classes
    elif name in _FILE_DATASETS:
        _check_files(name, _FILE_DATASETS[name], Path(cfg.data_dir))
        n, k = NOMINAL_TRAIN_SIZES[name], _FILE_DATASETS[name].num_classes
    else:
        raise _unknown(name)
    return (min(n, cfg.max_train_samples) if cfg.max_train_samples else n), k


def _check_files(name: str, spec: _FileSpec, root: Path) -> None:
    for rel in spec.required:
        if not (root / rel).exists():
            raise UserError(f"dataset {name} not found under {root} (expected {root / rel}); "
                            "pass --download or --data-dir pointing at it")


def _load_files(name: str, spec: _FileSpec, root: Path, image_size: int) -> tuple[Dataset, Dataset]:
    _check_files(name, spec, root)
    try:
        return spec.load(root, build_transform(image_size))
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, RuntimeError) as exc:
        raise UserError(f"dataset {name} under {root} could not be read ({_one_line(exc)}); "
                        "delete the broken files and fetch them again with --download") from None


def _limit(ds: Dataset, max_samples: int, seed: int, stream: int) -> tuple[Dataset, np.ndarray]:
    labels = dataset_labels(ds)
    if max_samples <= 0 or max_samples >= len(labels):
        return ds, labels
    keep = np.sort(np.random.default_rng([seed, stream]).permutation(len(labels))[:max_samples])
    return Subset(ds, keep.tolist()), labels[keep]


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded ``test_fraction`` of the samples (at least one when
    the class has two or more) goes to test; both index arrays sorted."""
    rng = np.random.default_rng([seed, _STREAM_SPLIT])
    test = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        n_test = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(len(members) * test_fraction)))
        test.append(members[:n_test])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx).astype(np.int64)
    return train_idx, test_idx


def _load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1797 x 64 pixels in 0..16, labels).

    Reads the CSV that ships inside scikit-learn directly: importing
    ``sklearn.datasets`` alone takes most of a second, the file a few ms.
    Falls back to ``load_digits`` should the file ever move.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")
        return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no network

    digits = load_digits()
    return digits.data, digits.target.astype(np.int64)


def _digits(image_size: int) -> tuple[TensorImages, TensorImages, int]:
    pixels, labels = _load_digits_arrays()
    images = torch.from_numpy(pixels.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # N x 1 x 8 x 8 in [0, 1]
    train_idx, test_idx = _stratified_split(labels, _TEST_FRACTION, _SPLIT_SEED)
    return (TensorImages(images[train_idx], labels[train_idx], image_size),
            TensorImages(images[test_idx], labels[test_idx], image_size), 10)


def _synthetic(num_train: int, num_classes: int, image_size: int, seed: int) -> tuple[TensorImages, TensorImages]:
    """One random 3 x 8 x 8 prototype per class; a sample is its class's
    prototype plus Gaussian noise, clipped to [0, 1]. Classes are balanced.
    Easy to learn, yet noisy enough that accuracy moves during training."""
    proto_rng, train_rng, test_rng = (np.random.default_rng([seed, _STREAM_SYNTH, i]) for i in range(3))
    prototypes = proto_rng.uniform(0.0, 1.0, size=(num_classes, 3, 8, 8))

    def draw(n: int, rng: np.random.Generator) -> TensorImages:
        labels = rng.permutation(np.arange(n) % num_classes)
        images = np.clip(prototypes[labels] + rng.normal(0.0, 0.4, size=(n, 3, 8, 8)), 0.0, 1.0)
        return TensorImages(torch.from_numpy(images.astype(np.float32)), labels, image_size)

    return draw(num_train, train_rng), draw(max(1, num_train // 4), test_rng)


def _unknown(name: str) -> UserError:
    return UserError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
