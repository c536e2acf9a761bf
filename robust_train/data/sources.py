"""What every dataset loader returns, and the config-reading helpers they share."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robust_train.errors import ConfigError, DataError


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


def get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """cfg.get that also works for OmegaConf nodes and turns ListConfig into a list."""
    value = cfg.get(key, default)
    if value is None:
        return default
    # OmegaConf's ListConfig is a Sequence; callers want a plain list.
    if not isinstance(value, str | bytes) and isinstance(value, Sequence):
        return list(value)
    return value


def data_root(cfg: Mapping[str, Any]) -> Path:
    """The configured data directory (absolute, for messages), defaulting like the YAML does."""
    root = cfg.get("root")
    if root is None:
        root = os.environ.get("ROBUST_TRAIN_DATA", "data")
    if not isinstance(root, str | os.PathLike):
        raise ConfigError(f"dataset.root={root!r} must be a directory path")
    return Path(root).expanduser().absolute()


def flag(cfg: Mapping[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"dataset.{key}={value!r} must be true or false")
    return value


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
