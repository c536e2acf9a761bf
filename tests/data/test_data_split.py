"""The held-out validation split, limits, config checks and the DataBundle itself."""

from __future__ import annotations

import pytest
import torch

from robust_train.data import DataBundle, build_dataset, resolve_val_size
from robust_train.errors import ConfigError, DataError


def _synthetic(**extra) -> dict:
    return {
        "name": "synthetic",
        "image_shape": [3, 4, 4],
        "train_size": 200,
        "test_size": 30,
        "val_size": 40,
        **extra,
    }


def _keys(x: torch.Tensor) -> set[bytes]:
    return {img.numpy().tobytes() for img in x}


def test_val_split_fixed_by_seed_and_disjoint_from_train():
    # mnist5k's images do not depend on the seed (synthetic ones do), so only the split can differ.
    a, b = build_dataset({"name": "mnist5k"}, seed=1), build_dataset({"name": "mnist5k"}, seed=1)
    c = build_dataset({"name": "mnist5k"}, seed=2)
    assert (
        torch.equal(a.val_x, b.val_x) and torch.equal(a.val_y, b.val_y) and torch.equal(a.train_x, b.train_x)
    )
    assert not torch.equal(a.val_x, c.val_x)
    assert torch.equal(a.test_x, c.test_x)  # the test set never depends on the seed
    assert _keys(a.train_x).isdisjoint(_keys(a.val_x))
    assert _keys(a.train_x) | _keys(a.val_x) == _keys(c.train_x) | _keys(c.val_x)


def test_val_split_uses_the_documented_permutation(tmp_path, fmt):
    w = fmt.write_cifar10(tmp_path)
    cfg = {
        "name": "cifar10",
        "root": str(tmp_path),
        "download": False,
        "check_integrity": False,
        "val_size": 6,
    }
    b = build_dataset(cfg, seed=7)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(b.val_x, torch.from_numpy(w["train_x"])[perm[:6]])
    assert torch.equal(b.val_y, torch.from_numpy(w["train_y"])[perm[:6]])


def test_val_size_fraction():
    b = build_dataset(_synthetic(val_size=0.25), seed=0)
    assert (len(b.train_y), len(b.val_y)) == (150, 50)


def test_val_size_zero_and_default():
    assert len(build_dataset(_synthetic(val_size=0), seed=0).val_y) == 0
    cfg = _synthetic(train_size=1200)
    del cfg["val_size"]
    assert len(build_dataset(cfg, seed=0).val_y) == 1000


@pytest.mark.parametrize("val_size", [200, 500, 1.0, 1.5, -1, "10", True, 0.0])
def test_bad_val_size_names_the_key(val_size):
    with pytest.raises(ConfigError, match=r"dataset\.val_size"):
        build_dataset(_synthetic(val_size=val_size), seed=0)


def test_resolve_val_size():
    assert resolve_val_size(10, 100) == 10
    assert resolve_val_size(0.1, 1000) == 100
    with pytest.raises(ConfigError, match="only 100 images"):
        resolve_val_size(100, 100)


def test_limits_keep_the_first_images_after_the_split():
    full = build_dataset(_synthetic(), seed=0)
    lim = build_dataset(_synthetic(train_limit=16, test_limit=5), seed=0)
    assert torch.equal(lim.train_x, full.train_x[:16]) and torch.equal(lim.test_x, full.test_x[:5])
    assert torch.equal(lim.val_x, full.val_x)  # untouched without val_limit
    both = build_dataset(_synthetic(val_limit=3, train_limit=1000), seed=0)
    assert torch.equal(both.val_x, full.val_x[:3]) and len(both.train_y) == 160


@pytest.mark.parametrize("key", ["train_limit", "test_limit", "val_limit"])
@pytest.mark.parametrize("value", [0, -3, 2.5, "8"])
def test_bad_limits(key, value):
    with pytest.raises(ConfigError, match=f"dataset.{key}"):
        build_dataset(_synthetic(**{key: value}), seed=0)


def test_mean_std_overrides_and_checks():
    b = build_dataset(_synthetic(mean=[0.1, 0.2, 0.3], std=[1, 2, 3]), seed=0)
    assert b.mean == (0.1, 0.2, 0.3) and b.std == (1.0, 2.0, 3.0)
    with pytest.raises(ConfigError, match="dataset.mean"):
        build_dataset(_synthetic(mean=[0.5]), seed=0)
    with pytest.raises(ConfigError, match="dataset.std"):
        build_dataset(_synthetic(std=[0.1, 0.0, 0.1]), seed=0)


def test_omegaconf_node_is_accepted():
    from omegaconf import OmegaConf

    b = build_dataset(OmegaConf.create(_synthetic(mean=[0.5, 0.5, 0.5])), seed=0)
    assert b.image_shape == (3, 4, 4) and b.mean == (0.5, 0.5, 0.5)


def test_bundle_to_summary_and_validation():
    b = build_dataset(_synthetic(), seed=0)
    moved = b.to("cpu")
    assert moved is not b and torch.equal(moved.train_x, b.train_x)
    assert b.summary() == "synthetic: train 160, val 40, test 30 images of 3x4x4 uint8, 10 classes, on cpu"
    with pytest.raises(DataError, match="uint8"):
        DataBundle(
            "bad", b.train_x.float(), b.train_y, b.val_x, b.val_y, b.test_x, b.test_y, 10, b.mean, b.std
        )
    with pytest.raises(DataError, match="int64"):
        DataBundle("bad", b.train_x, b.train_y[:3], b.val_x, b.val_y, b.test_x, b.test_y, 10, b.mean, b.std)
