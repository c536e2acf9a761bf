"""Pieces shared by every architecture: input normalization, width scaling and the model interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from robust_train.errors import ConfigError
from robust_train.schema import Number, Schema

NORMALIZE_MODES = ("none", "meanstd")
# `model` keys that are not passed to the architecture's builder.
NOT_BUILDER_OPTIONS = ("name", "init_from")
GRANULARITIES = ("stage", "block")


class ModelConfig(Schema):
    """The `model` node: an architecture by `name`, its width multiplier and input normalization.

    An architecture with options of its own (resnet18's `stem`) subclasses this. The registered
    builder is called with `num_classes`, `mean`, `std` and every field but `name` as keywords.
    """

    name: str
    # Scales every channel count (max(1, round(c * width))), never spatial sizes: 0.0625 for CPU tests.
    width: Annotated[Number, Field(gt=0, le=16)] = 1.0
    # meanstd: the model's first layer normalizes with the dataset's statistics; none: raw [0, 1] input.
    normalize: Literal["none", "meanstd"] = "meanstd"
    # A weights file the training run starts from (ours, a plain state_dict or a RobustBench checkpoint;
    # robust_train/models/init.py). Not an architecture option: the builder never sees it.
    init_from: str | None = None

    def options(self) -> dict[str, Any]:
        """The builder's keyword arguments besides num_classes/mean/std."""
        return {k: getattr(self, k) for k in type(self).model_fields if k not in NOT_BUILDER_OPTIONS}


def scale_channels(channels: int, width: float) -> int:
    """Channel count under the width multiplier: max(1, round(channels * width))."""
    return max(1, int(round(channels * width)))


class Normalize(nn.Module):
    """(x - mean) / std per channel, so that the model takes [0, 1] images.

    mean and std are non-persistent buffers: they follow `.to(device/dtype)` but stay out of the
    state_dict, so checkpoints of the reference codes (which normalize outside the network) load
    unchanged and the normalization is decided by the config, not by the checkpoint.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def make_normalize(mode: str, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """The model's first op: Normalize for 'meanstd', identity for 'none'."""
    if mode == "none":
        return nn.Identity()
    if mode != "meanstd":
        raise ConfigError(f"model.normalize={mode!r} is not known; allowed: {', '.join(NORMALIZE_MODES)}")
    mean_l, std_l = list(mean), list(std)
    if len(mean_l) != 3 or len(std_l) != 3:
        raise ConfigError(
            f"normalization mean/std need 3 values (one per RGB channel), got mean={mean_l} std={std_l}"
        )
    if any(float(s) <= 0 for s in std_l):
        raise ConfigError(f"normalization std must be > 0 for every channel, got {std_l}")
    return Normalize(mean_l, std_l)


class RobustModel(nn.Module, ABC):
    """Base class of every architecture: [0, 1] images in, logits out.

    Subclasses build their layers, set `fc`, `feature_layers` and `block_layers`, and implement
    `forward_body(z)`, which maps the normalized input to the pooled penultimate vector.
    """

    arch: str = ""
    fc: nn.Linear

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: str = "meanstd",
        width: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.width = float(width)
        self.normalize_mode = normalize
        self.normalize = make_normalize(normalize, mean, std)
        self.feature_layers: list[str] = []
        self.block_layers: list[str] = []

    @abstractmethod
    def forward_body(self, z: Tensor) -> Tensor:
        """Normalized input -> pooled penultimate features (N, fc.in_features)."""

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate vector for [0, 1] input x; `fc(features(x)) == forward(x)`."""
        return self.forward_body(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))

    def feature_layer_names(self, granularity: str = "stage") -> list[str]:
        """Stage outputs ('stage') or every residual-block output ('block'), in forward order."""
        if granularity == "stage":
            return list(self.feature_layers)
        if granularity == "block":
            return list(self.block_layers)
        raise ConfigError(f"granularity={granularity!r} is not known; allowed: {', '.join(GRANULARITIES)}")


def pool_flatten(x: Tensor) -> Tensor:
    """Global average pool to 1x1 and flatten; equals avg_pool2d(4)/(8) at 32x32, also fits 64x64."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def sequential_block_names(stage_names: Sequence[str], stages: Sequence[nn.Sequential]) -> list[str]:
    """'stage.i' for every block of every stage, in forward order."""
    return [f"{name}.{i}" for name, stage in zip(stage_names, stages, strict=True) for i in range(len(stage))]
