"""build_dataset: dataset config node -> DataBundle (load, carve the validation split, apply limits)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from robust_train.data.bundle import DataBundle
from robust_train.data.mnist5k import load_mnist5k
from robust_train.data.real import load_cifar10, load_cifar100, load_svhn, load_tiny_imagenet
from robust_train.data.sources import Source, get
from robust_train.data.synthetic import load_synthetic
from robust_train.errors import ConfigError

_LOADERS: dict[str, Callable[[Mapping[str, Any], int], Source]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "svhn": load_svhn,
    "tiny_imagenet": load_tiny_imagenet,
    "mnist5k": load_mnist5k,
    "synthetic": load_synthetic,
}
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)


def resolve_val_size(val_size: Any, n_train: int) -> int:
    """A count (int) or fraction (float in (0, 1)) of the `n_train` training images -> a count."""
    if isinstance(val_size, bool) or not isinstance(val_size, int | float):
        raise ConfigError(
            f"dataset.val_size={val_size!r} must be a count (int >= 0) or a fraction (float in (0, 1))"
        )
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ConfigError(
                f"dataset.val_size={val_size!r}: a fraction must lie in (0, 1); use an int for a count"
            )
        count = round(val_size * n_train)
    else:
        count = val_size
    if count < 0:
        raise ConfigError(f"dataset.val_size={val_size!r} must be >= 0")
    if count >= n_train:
        raise ConfigError(
            f"dataset.val_size={val_size!r} leaves no training images: the training set has only {n_train} "
            f"images; choose fewer than {n_train}"
        )
    return int(count)


def _limit(cfg: Mapping[str, Any], key: str) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"dataset.{key}={value!r} must be null or an integer >= 1")
    return value


def _stats(cfg: Mapping[str, Any], key: str, default: tuple[float, ...], channels: int) -> tuple[float, ...]:
    value = get(cfg, key)
    if value is None:
        return default
    if (
        not isinstance(value, list)
        or len(value) != channels
        or not all(isinstance(v, int | float) for v in value)
    ):
        raise ConfigError(f"dataset.{key}={value!r} must be a list of {channels} numbers (one per channel)")
    if key == "std" and any(v <= 0 for v in value):
        raise ConfigError(f"dataset.std={value!r} must be positive")
    return tuple(float(v) for v in value)


def _check_declared(cfg: Mapping[str, Any], name: str, source: Source) -> None:
    """The config's num_classes / image_shape, when given, must describe the data that was loaded."""
    declared = cfg.get("num_classes")
    if declared is not None and declared != source.num_classes:
        raise ConfigError(
            f"dataset.num_classes={declared} but the {name} files have {source.num_classes} classes"
        )
    shape = get(cfg, "image_shape")
    actual = list(source.train_x.shape[1:])
    if shape is not None and list(shape) != actual:
        raise ConfigError(f"dataset.image_shape={list(shape)} but the {name} images are {actual}")


def build_dataset(cfg: Mapping[str, Any], seed: int) -> DataBundle:
    """Load the dataset that `cfg` (the `dataset` config node) names and split it.

    The validation split is `val_size` training images chosen by a permutation from
    `torch.Generator().manual_seed(seed)`; the training set keeps the rest, in that permuted order,
    so `train_limit` keeps a random (seed-fixed) subset. The test set is the dataset's own.
    """
    name = cfg.get("name")
    if name not in _LOADERS:
        raise ConfigError(
            f"dataset.name={name!r} is not a known dataset; allowed: {', '.join(DATASET_NAMES)}"
        )
    limits = {key: _limit(cfg, key) for key in ("train_limit", "val_limit", "test_limit")}
    val_size = cfg.get("val_size")
    if val_size is not None:
        resolve_val_size(val_size, 2**62)  # type and range errors before any file is read
    source = _LOADERS[name](cfg, int(seed))
    _check_declared(cfg, name, source)

    n = len(source.train_y)
    n_val = resolve_val_size(source.default_val_size if val_size is None else val_size, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if limits["train_limit"] is not None:
        train_idx = train_idx[: limits["train_limit"]]
    if limits["val_limit"] is not None:
        val_idx = val_idx[: limits["val_limit"]]
    test_x, test_y = source.test_x, source.test_y
    if limits["test_limit"] is not None:
        test_x, test_y = test_x[: limits["test_limit"]], test_y[: limits["test_limit"]]

    channels = source.train_x.shape[1]
    return DataBundle(
        name=name,
        train_x=source.train_x[train_idx],
        train_y=source.train_y[train_idx],
        val_x=source.train_x[val_idx],
        val_y=source.train_y[val_idx],
        test_x=test_x.contiguous(),
        test_y=test_y.contiguous(),
        num_classes=source.num_classes,
        mean=_stats(cfg, "mean", source.mean, channels),
        std=_stats(cfg, "std", source.std, channels),
    )
