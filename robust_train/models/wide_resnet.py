"""WideResNet (robust_overfitting / AWP variant: no unused `sub_block1`), TRADES module names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from robust_train.errors import ConfigError
from robust_train.models.base import ModelConfig, RobustModel, pool_flatten, scale_channels
from robust_train.registry import MODELS
from robust_train.schema import Number


class WideResNetConfig(ModelConfig):
    # Dropout between the two convs of every block (the TRADES / AWP models use 0).
    drop_rate: Annotated[Number, Field(ge=0, lt=1)] = 0.0


class WideBasicBlock(nn.Module):
    """Pre-activation wide block; identity shortcut takes the raw input, projection the activated one."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        # Not in-place: a hook may hold the tensor a ReLU would overwrite.
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equalInOut = in_planes == out_planes and stride == 1
        # camelCase keeps the key names of the TRADES/MART checkpoints.
        self.convShortcut: nn.Conv2d | None = None
        if not self.equalInOut:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu1(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(a)
        out = self.relu2(self.bn2(self.conv1(a)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return self.conv2(out) + shortcut


class NetworkBlock(nn.Module):
    """One WRN stage; blocks live in `.layer` so they are named `blockN.layer.i`."""

    def __init__(
        self, num_blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate
                )
                for i in range(num_blocks)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(RobustModel):
    """WRN-depth-k: conv1, block1..block3 ((depth-4)/6 blocks each), bn1-relu, global average pool, fc."""

    def __init__(
        self,
        arch: str,
        depth: int,
        widen_factor: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: str = "meanstd",
        width: float = 1.0,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, mean, std, normalize, width)
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet depth must be 6n+4, got {depth}")
        if not 0.0 <= drop_rate < 1.0:
            raise ConfigError(f"model.drop_rate={drop_rate} must be in [0, 1)")
        self.arch = arch
        n = (depth - 4) // 6
        channels = [
            scale_channels(c, width) for c in (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        ]
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)
        self.feature_layers = ["block1", "block2", "block3"]
        self.block_layers = [f"{b}.layer.{i}" for b in self.feature_layers for i in range(n)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_body(self, z: Tensor) -> Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(z))))
        return pool_flatten(self.relu(self.bn1(out)))


@MODELS.register("wrn34_10", schema=WideResNetConfig)
def wrn34_10(
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float,
    normalize: str,
    drop_rate: float,
) -> WideResNet:
    """WideResNet-34-10 (5 blocks per stage, 160/320/640 channels)."""
    return WideResNet("wrn34_10", 34, 10, num_classes, mean, std, normalize, width, drop_rate)


@MODELS.register("wrn28_10", schema=WideResNetConfig)
def wrn28_10(
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float,
    normalize: str,
    drop_rate: float,
) -> WideResNet:
    """WideResNet-28-10 (4 blocks per stage, 160/320/640 channels)."""
    return WideResNet("wrn28_10", 28, 10, num_classes, mean, std, normalize, width, drop_rate)


@MODELS.register("wrn34_20", schema=WideResNetConfig)
def wrn34_20(
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float,
    normalize: str,
    drop_rate: float,
) -> WideResNet:
    """WideResNet-34-20 (5 blocks per stage, 320/640/1280 channels): RobustBench's `WideResNet(34, 20)`
    (Rice2020Overfitting, Chen2021LTD_WRN34_20, Cui2020Learnable_34_20 without its unused sub_block1)."""
    return WideResNet("wrn34_20", 34, 20, num_classes, mean, std, normalize, width, drop_rate)


def filter_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Make a reference WRN checkpoint loadable: drop `sub_block*` keys, strip a `module.` prefix.

    Also unwraps a `{'state_dict': ...}` container. The TRADES/MART WRN defines an unused `sub_block1`
    whose weights are saved in their official checkpoints; our model has no such module.
    """
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if "sub_block" in key:
            continue
        out[key.removeprefix("module.")] = value
    return out
