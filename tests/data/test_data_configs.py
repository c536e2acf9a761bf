"""conf/dataset/*.yaml: every composed node has the agreed keys and builds through build_dataset.

The files list only what differs from their schema (robust_train/data); the nodes are composed by Hydra
over the schema's defaults, as a run sees them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from robust_train.data import DATASET_NAMES, build_dataset
from robust_train.data.sources import data_root

CONF = Path(__file__).resolve().parents[2] / "robust_train" / "conf" / "dataset"
REAL = ("cifar10", "cifar100", "svhn", "tiny_imagenet")
COMMON = (
    "name", "val_size", "train_limit", "val_limit", "test_limit", "num_classes", "image_shape", "mean", "std",
    "crop_pad", "flip", "padding_mode", "threat",
)  # fmt: skip


@pytest.fixture
def load(compose):
    def _load(name: str):
        return compose([f"dataset={name}", "logger=none"]).dataset

    return _load


def test_one_file_per_dataset():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(DATASET_NAMES)


@pytest.mark.parametrize("name", DATASET_NAMES)
def test_keys(name, monkeypatch, load):
    monkeypatch.setenv("ROBUST_TRAIN_DATA", "/datasets")
    cfg = load(name)
    assert cfg.name == name
    for key in COMMON:
        assert key in cfg, key
    assert cfg.train_limit is None and cfg.test_limit is None and cfg.crop_pad == 4
    assert cfg.padding_mode == "zero" and cfg.threat.norm == "linf"
    # Extra (generated) training data is off unless asked for, on every dataset.
    assert cfg.extra is None and cfg.extra_fraction == 0.7 and cfg.epoch_steps is None
    if name == "image_folder":  # the files describe the data: shape, classes and statistics come from them
        assert cfg.image_shape is None and cfg.mean is None and cfg.num_classes is None
        assert cfg.root is None and cfg.csv is None and cfg.resize is False
        return
    assert len(cfg.mean) == len(cfg.std) == cfg.image_shape[0]
    if name in REAL:
        assert cfg.download is True and cfg.check_integrity is True and data_root(cfg) == Path("/datasets")
        assert (cfg.threat.eps, cfg.threat.step) == ("8/255", "eps/4")
        assert list(cfg.image_shape) == ([3, 64, 64] if name == "tiny_imagenet" else [3, 32, 32])
    assert cfg.flip is (name not in ("svhn", "mnist5k"))


def test_root_falls_back_to_data(monkeypatch, load):
    monkeypatch.delenv("ROBUST_TRAIN_DATA", raising=False)
    assert data_root(load("cifar10")) == Path("data").absolute()


def test_mnist5k_config_builds(load):
    cfg = load("mnist5k")
    assert (cfg.threat.eps, cfg.threat.step) == (0.1, "eps/4")
    b = build_dataset(cfg, seed=0)
    assert (len(b.train_y), len(b.val_y), len(b.test_y)) == (3500, 500, 1000)
    assert list(b.mean) == list(cfg.mean) and b.num_classes == cfg.num_classes


def test_synthetic_config_builds(load):
    cfg = load("synthetic")
    assert (cfg.train_size, cfg.test_size, cfg.val_size, cfg.num_classes) == (50000, 10000, 1000, 10)
    cfg.train_size, cfg.test_size, cfg.val_size = 64, 8, 8
    b = build_dataset(cfg, seed=0)
    assert b.image_shape == (3, 32, 32) and (len(b.train_y), len(b.val_y)) == (56, 8)


@pytest.mark.parametrize("name", REAL)
def test_real_configs_build_from_tiny_files(name, tmp_path, fmt, load):
    {
        "cifar10": lambda: fmt.write_cifar10(tmp_path),
        "cifar100": lambda: fmt.write_cifar100(tmp_path),
        "svhn": lambda: fmt.write_svhn(tmp_path / "svhn"),
        "tiny_imagenet": lambda: fmt.write_tiny_imagenet(tmp_path),
    }[name]()
    cfg = load(name)
    cfg.root, cfg.check_integrity, cfg.download, cfg.val_size = str(tmp_path), False, False, 2
    if name == "tiny_imagenet":
        cfg.num_classes = 3  # the tiny copy has 3 wnids
    b = build_dataset(cfg, seed=0)
    assert list(b.image_shape) == list(cfg.image_shape) and len(b.val_y) == 2
