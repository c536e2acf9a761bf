"""build_dataset: dataset config node -> DataBundle (load, carve the validation split, apply limits).

`resolve_val_size` is re-exported from `sources`, where the schema uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import robust_train.data.image_folder  # noqa: F401  (each loader module registers its datasets)
import robust_train.data.mnist5k  # noqa: F401
import robust_train.data.real  # noqa: F401
import robust_train.data.synthetic  # noqa: F401
from robust_train.data.bundle import DataBundle
from robust_train.data.sources import DatasetConfig, Source, resolve_val_size
from robust_train.errors import ConfigError
from robust_train.registry import DATASETS
from robust_train.schema import check_node, did_you_mean, plain, raise_problems

__all__ = [
    "DATASET_NAMES",
    "build_dataset",
    "check_dataset",
    "check_training_data",
    "dataset_names",
    "resolve_val_size",
]

# The package's own datasets, in their usual order (each registered in DATASETS by its module).
DATASET_NAMES: tuple[str, ...] = (
    "cifar10", "cifar100", "svhn", "tiny_imagenet", "mnist5k", "synthetic", "image_folder",
)  # fmt: skip


def dataset_names() -> list[str]:
    """Every selectable dataset: ours in their usual order, then the plugins'."""
    return [*DATASET_NAMES, *(n for n in DATASETS.names() if n not in DATASET_NAMES)]


def check_dataset(node: Any, path: str = "dataset") -> tuple[DatasetConfig | None, list[str]]:
    """A `dataset` node validated by the schema of the dataset its `name` selects, or the problems."""
    data = plain(node) or {}
    name = data.get("name") if isinstance(data, Mapping) else None
    if not isinstance(name, str) or name not in DATASETS:
        names = dataset_names()
        return None, [
            f"{path}.name={name!r} is not a known dataset; allowed: {', '.join(names)}"
            + did_you_mean(str(name), names)
        ]
    return check_node(DATASETS.get(name).schema, data, path)


def check_training_data(node: Any, path: str = "dataset") -> None:
    """Refuse, before a training run starts, data that only training needs and cannot use: extra files
    (`dataset.extra`) that are missing or not in the expected format, a dataset without a training split.
    One ConfigError listing every problem."""
    ds, problems = check_dataset(node, path)
    if ds is not None and hasattr(ds, "training_problems"):  # a plugin's schema may not extend ours
        problems = ds.training_problems(path)
    raise_problems(problems)


def _stats(
    value: list[float] | None, key: str, default: tuple[float, ...], channels: int
) -> tuple[float, ...]:
    if value is None:
        return default
    if len(value) != channels:
        raise ConfigError(f"dataset.{key}={value!r} must be a list of {channels} numbers (one per channel)")
    return tuple(float(v) for v in value)


def _check_declared(cfg: DatasetConfig, name: str, source: Source) -> None:
    """The config's num_classes / image_shape, when given, must describe the data that was loaded."""
    declared = cfg.num_classes
    if declared is not None and declared != source.num_classes:
        raise ConfigError(
            f"dataset.num_classes={declared} but the {name} files have {source.num_classes} classes"
        )
    actual = list(source.train_x.shape[1:])
    if cfg.image_shape is not None and list(cfg.image_shape) != actual:
        raise ConfigError(f"dataset.image_shape={list(cfg.image_shape)} but the {name} images are {actual}")


def build_dataset(cfg: Any, seed: int) -> DataBundle:
    """Load the dataset that `cfg` (the `dataset` config node) names and split it.

    The validation split is `val_size` training images chosen by a permutation from
    `torch.Generator().manual_seed(seed)`; the training set keeps the rest, in that permuted order,
    so `train_limit` keeps a random (seed-fixed) subset. The test set is the dataset's own.
    """
    ds, problems = check_dataset(cfg)
    raise_problems(problems)
    assert ds is not None
    name = ds.name
    source = DATASETS.get(name).cls(ds, int(seed))
    _check_declared(ds, name, source)

    n = len(source.train_y)
    # A dataset without a training split (an image folder as a test set) has nothing to hold out.
    val_size = source.default_val_size if ds.val_size is None else ds.val_size
    n_val = 0 if n == 0 else resolve_val_size(val_size, n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if ds.train_limit is not None:
        train_idx = train_idx[: ds.train_limit]
    if ds.val_limit is not None:
        val_idx = val_idx[: ds.val_limit]
    test_x, test_y = source.test_x, source.test_y
    if ds.test_limit is not None:
        test_x, test_y = test_x[: ds.test_limit], test_y[: ds.test_limit]

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
        mean=_stats(ds.mean, "mean", source.mean, channels),
        std=_stats(ds.std, "std", source.std, channels),
    )
