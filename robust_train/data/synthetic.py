"""synthetic: random uint8 images and random labels of any shape, for benchmarks (nothing to learn)."""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from robust_train.data.sources import DatasetConfig, ImageShape, Source
from robust_train.registry import DATASETS
from robust_train.schema import Integer, PositiveInt

# Keeps the data stream distinct from the validation permutation, which is seeded with `seed` itself.
_DATA_SEED_OFFSET = 0x5EED


class SyntheticConfig(DatasetConfig):
    """Random images of any shape; `num_classes` and `image_shape` here define the data."""

    image_shape: ImageShape = [3, 32, 32]
    num_classes: Annotated[Integer, Field(ge=2)] = 10
    train_size: PositiveInt = 50000
    test_size: PositiveInt = 10000


@DATASETS.register("synthetic", schema=SyntheticConfig)
def load_synthetic(cfg: SyntheticConfig, seed: int) -> Source:
    """`train_size` + `test_size` images of `image_shape`, uint8, drawn deterministically from the seed."""
    shape = list(cfg.image_shape)
    num_classes, n_train, n_test = cfg.num_classes, cfg.train_size, cfg.test_size
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
