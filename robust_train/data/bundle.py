"""The in-memory dataset that the rest of the runner consumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from robust_train.errors import DataError

_SPLITS = ("train", "val", "test")


@dataclass
class DataBundle:
    """Train / validation / test splits as uint8 NCHW images and int64 labels, plus normalization stats.

    Images stay uint8 (4x smaller than float) so that whole datasets fit on the training device;
    `augment_batch` / `to_float` turn batches into float [0, 1] there.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        shape: tuple[int, ...] | None = None
        for split in _SPLITS:
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise DataError(
                    f"dataset {self.name!r}: {split}_x must be uint8 NCHW, got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise DataError(
                    f"dataset {self.name!r}: {split}_y must be int64 of length {x.shape[0]}, "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if shape is not None and tuple(x.shape[1:]) != shape:
                raise DataError(
                    f"dataset {self.name!r}: {split}_x has image shape {tuple(x.shape[1:])}, not {shape}"
                )
            shape = tuple(x.shape[1:])
        assert shape is not None  # _SPLITS is not empty
        if len(self.mean) != shape[0] or len(self.std) != shape[0]:
            raise DataError(
                f"dataset {self.name!r}: mean/std need one value per channel ({shape[0]}), "
                f"got {len(self.mean)}/{len(self.std)}"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    def to(self, device: torch.device | str) -> DataBundle:
        """A new bundle whose tensors live on `device` (this one is left untouched)."""
        moved = {}
        for split in _SPLITS:
            for kind in ("x", "y"):
                key = f"{split}_{kind}"
                moved[key] = getattr(self, key).to(device)
        return dataclasses.replace(self, **moved)

    def summary(self) -> str:
        """One line: name, split sizes, image shape, classes, device."""
        c, h, w = self.image_shape
        return (
            f"{self.name}: train {len(self.train_y)}, val {len(self.val_y)}, test {len(self.test_y)} images "
            f"of {c}x{h}x{w} uint8, {self.num_classes} classes, on {self.train_x.device}"
        )
