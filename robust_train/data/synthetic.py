"""synthetic: random uint8 images and random labels of any shape, for benchmarks (nothing to learn)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from robust_train.data.sources import Source, get
from robust_train.errors import ConfigError

# Keeps the data stream distinct from the validation permutation, which is seeded with `seed` itself.
_DATA_SEED_OFFSET = 0x5EED


def _positive_int(cfg: Mapping[str, Any], key: str, default: int, minimum: int = 1) -> int:
    value = get(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"dataset.{key}={value!r} must be an integer >= {minimum}")
    return value


def load_synthetic(cfg: Mapping[str, Any], seed: int) -> Source:
    """`train_size` + `test_size` images of `image_shape`, uint8, drawn deterministically from the seed."""
    shape = get(cfg, "image_shape", [3, 32, 32])
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape)
    ):
        raise ConfigError(f"dataset.image_shape={shape!r} must be three positive integers [C, H, W]")
    num_classes = _positive_int(cfg, "num_classes", 10, minimum=2)
    n_train = _positive_int(cfg, "train_size", 50000)
    n_test = _positive_int(cfg, "test_size", 10000)
    channels = shape[0]

    gen = torch.Generator().manual_seed(int(seed) + _DATA_SEED_OFFSET)
    # Drawn straight into uint8 so that large benchmark sets never exist as float tensors.
    train_x = torch.randint(0, 256, (n_train, *shape), dtype=torch.uint8, generator=gen)
    train_y = torch.randint(0, num_classes, (n_train,), generator=gen)
    test_x = torch.randint(0, 256, (n_test, *shape), dtype=torch.uint8, generator=gen)
    test_y = torch.randint(0, num_classes, (n_test,), generator=gen)
    return Source(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        default_val_size=1000,
    )
