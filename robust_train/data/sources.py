"""What every dataset loader returns, the schema of the `dataset` node, and helpers loaders share."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import BeforeValidator, Field, field_validator

from robust_train.errors import ConfigError, DataError
from robust_train.schema import (
    Flag,
    NonNegativeInt,
    Number,
    PositiveInt,
    Schema,
    ThreatConfig,
    UnitNumber,
)


def _shape(value: Any) -> Any:
    if value is not None and not (
        isinstance(value, list | tuple)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError("must be [channels, height, width] of positive integers")
    return value


# [channels, height, width]
ImageShape = Annotated[list[int], BeforeValidator(_shape)]


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


def _paths(value: Any) -> Any:
    """`dataset.extra`: one path or a list of paths -> a list (an empty list is null)."""
    if isinstance(value, str | os.PathLike):
        value = [value]
    if isinstance(value, list | tuple):
        if not all(isinstance(v, str | os.PathLike) and str(v).strip() for v in value):
            raise ValueError("must be a path or a list of paths to .npz files")
        return [str(v) for v in value] or None
    if value is not None:
        raise ValueError("must be a path or a list of paths to .npz files")
    return value


def _val_size(value: Any) -> Any:
    if value is not None:
        try:
            resolve_val_size(value, 2**62)  # the type and range; the size of the training set is known later
        except ConfigError as err:
            raise ValueError(str(err)) from None
    return value


class DatasetConfig(Schema):
    """The `dataset` node: which data, the validation split, quick-run limits and augmentation.

    `num_classes`, `image_shape`, `mean` and `std` describe the data: set, they are checked against the
    loaded files (and let the run check the model's shapes before any file is read); null, the files
    decide. A dataset with options of its own subclasses this.
    """

    name: str
    # Held-out validation images carved from the training set by the seed: a count, or a fraction in
    # (0, 1); null: the dataset's usual size.
    val_size: Annotated[int | float | None, BeforeValidator(_val_size)] = None
    # Keep only the first N training / validation / test images (quick runs); null keeps all.
    train_limit: PositiveInt | None = None
    val_limit: PositiveInt | None = None
    test_limit: PositiveInt | None = None
    num_classes: PositiveInt | None = None
    image_shape: ImageShape | None = None
    # Per-channel statistics used by the model's normalization layer; null: the dataset's own.
    mean: list[Number] | None = None
    std: list[Annotated[Number, Field(gt=0)]] | None = None
    # Device-side augmentation: random crop from the image padded by crop_pad (zero or reflect), flip.
    crop_pad: NonNegativeInt = 4
    flip: Flag = True
    padding_mode: Literal["zero", "reflect"] = "zero"
    # The dataset's usual threat model; the run's `threat` defaults to it.
    threat: ThreatConfig = ThreatConfig()
    # Extra training images (e.g. generated ones) streamed from uncompressed .npz files in the
    # DM-Improves-AT format (uint8 `image` N x H x W x C, integer `label` N): a path or a list of paths,
    # concatenated (robust_train/data/extra.py). null: none. Used by training only.
    extra: Annotated[list[str] | None, BeforeValidator(_paths)] = None
    # Share of every training batch taken from `extra` (DM-AT's unsup_fraction; int(batch x fraction)).
    extra_fraction: UnitNumber = 0.7
    # Steps per epoch with `extra`; null: ceil(training images / batch size), DM-AT's definition.
    epoch_steps: PositiveInt | None = None

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, list | tuple):
            raise ValueError("must be a list of numbers (one per channel)")
        return value

    def check(self, path: str) -> list[str]:
        problems = super().check(path)
        if self.epoch_steps is not None and not self.extra:
            problems.append(
                f"{path}.epoch_steps={self.epoch_steps} needs {path}.extra: without extra data an epoch is "
                "one pass over the training set"
            )
        if self.image_shape is not None:
            for key in ("mean", "std"):
                stats = getattr(self, key)
                if stats is not None and len(stats) != self.image_shape[0]:
                    problems.append(
                        f"{path}.{key} has {len(stats)} values but {path}.image_shape has "
                        f"{self.image_shape[0]} channels"
                    )
        return problems

    def training_problems(self, path: str) -> list[str]:
        """What only training needs of the data, checked before a training run starts (robust-eval never
        reads `extra`, so a checkpoint whose extra files moved still evaluates)."""
        if not self.extra:
            return []
        from robust_train.data.extra import check_extra_files  # reads file headers: only when asked

        shape = list(self.image_shape) if self.image_shape is not None else None
        return check_extra_files(self.extra, shape, self.num_classes, f"{path}.extra")


class FileDatasetConfig(DatasetConfig):
    """A dataset read from files under `root` (downloaded with torchvision when `download`)."""

    # null: $ROBUST_TRAIN_DATA, else ./data (layouts: robust_train/data/__init__.py).
    root: str | None = None
    download: Flag = True
    # torchvision's MD5 check of the files; false only for files you trust (the tests' tiny copies).
    check_integrity: Flag = True


@dataclass
class Source:
    """A dataset as its files define it: the official train and test splits, before any carving."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_val_size: int | float


def data_root(cfg: Any) -> Path:
    """The configured data directory (absolute, for messages): `root`, else $ROBUST_TRAIN_DATA, else data."""
    root = cfg.get("root")
    if root is None:
        root = os.environ.get("ROBUST_TRAIN_DATA", "data")
    if not isinstance(root, str | os.PathLike):
        raise ConfigError(f"dataset.root={root!r} must be a directory path")
    return Path(root).expanduser().absolute()


def nhwc_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) uint8 array -> contiguous (N, C, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def labels_to_tensor(labels: Any, num_classes: int, what: str) -> torch.Tensor:
    """Labels -> int64 tensor, checked to lie in [0, num_classes)."""
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(
            f"{what}: labels range from {int(y.min())} to {int(y.max())}, expected 0..{num_classes - 1}"
        )
    return y


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, short enough for a one-line error."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return msg if len(msg) <= 240 else msg[:237] + "..."


def missing_files_error(
    name: str, root: Path, searched: Path, layout: str, download: bool, url: str, reason: str | None
) -> DataError:
    """The DataError for files that are absent (and could not be downloaded)."""
    if not download:
        fetch = "Download is off (dataset.download=false)."
    else:
        fetch = f"Download from {url} failed: {reason}."
    return DataError(
        f"dataset {name!r}: files not found under dataset.root={root} (looked in {searched}). "
        f"Expected layout: {layout}. {fetch} "
        f"Fix: put the files there, or set dataset.root=/path/to/dir (or the ROBUST_TRAIN_DATA "
        f"environment variable) to the directory that holds them."
    )
