"""Swish (SiLU) WideResNets with the normalization inside, as RobustBench and DeepMind define them.

The layout is RobustBench's `DMWideResNet` (robustbench/model_zoo/architectures/dm_wide_resnet.py, from
deepmind-research adversarial_robustness/pytorch/model_zoo.py), which the DM-Improves-AT training code
(core/models/wideresnetwithswish.py) also uses: `init_conv`, three groups `layer.{0,1,2}` of blocks
`layer.g.block.i` (`batchnorm_0`, `conv_0`, `batchnorm_1`, `conv_1`, `shortcut`), a final `batchnorm`
and the linear head `logits`. Every state_dict key is RobustBench's, so their checkpoints of Gowal et
al. 2020, Rebuffi et al. 2021 and Wang et al. 2023 load without renaming.

What differs from our ReLU WideResNet (wide_resnet.py) besides the names and the activation: the first
conv of a stride-2 block pads only right and bottom (TensorFlow's `SAME`, the network was first trained
in JAX), so its 3x3 windows are centred one pixel further right and down than with symmetric padding.
The mean and std are non-persistent buffers, as in RobustBench: a checkpoint carries none, the model
chooses them (`stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from robust_train.errors import ConfigError
from robust_train.models.base import ModelConfig, RobustModel, pool_flatten, scale_channels
from robust_train.registry import MODELS
from robust_train.schema import Number

# The constants of the DM code (dm_wide_resnet.py, wideresnetwithswish.py). Our CIFAR-10 loader uses the
# same CIFAR-10 numbers; its CIFAR-100 and SVHN statistics differ in the 4th decimal and beyond.
DM_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
STATS_CHOICES = ("dataset", *DM_STATS)

# (registered name, depth, widen factor): every Swish DMWideResNet of RobustBench's CIFAR model zoo.
DM_WIDE_RESNETS: tuple[tuple[str, int, int], ...] = (
    ("wrn28_10_silu", 28, 10),
    ("wrn34_10_silu", 34, 10),
    ("wrn34_20_silu", 34, 20),
    ("wrn70_16_silu", 70, 16),
    ("wrn82_8_silu", 82, 8),
    ("wrn94_16_silu", 94, 16),
    ("wrn106_16_silu", 106, 16),
)


class DMWideResNetConfig(ModelConfig):
    # The normalization inside the model: the dataset's mean/std, or the DM code's constants for a
    # dataset (a RobustBench CIFAR-100 checkpoint was trained with `cifar100`'s).
    stats: Literal["dataset", "cifar10", "cifar100", "svhn"] = "dataset"
    # BatchNorm running-average momentum (PyTorch convention). RobustBench's definition keeps PyTorch's
    # 0.1; the DM-Improves-AT training code uses 0.01 (Haiku's decay 0.99).
    bn_momentum: Annotated[Number, Field(gt=0, le=1)] = 0.1


class DMBlock(nn.Module):
    """Pre-activation block: BN-SiLU-conv(3x3, stride, SAME padding)-BN-SiLU-conv(3x3), plus shortcut.

    With a projection (in != out channels), the 1x1 shortcut reads the activated input; otherwise the
    raw input is added.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, bn_momentum: float) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ConfigError(f"DMWideResNet blocks take stride 1 or 2, got {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=bn_momentum)
        # Not in place: a feature hook may hold the tensor an in-place activation would overwrite.
        self.relu_0 = nn.SiLU()
        # Stride 1: symmetric padding is SAME, done by the conv. Stride 2: padded by hand in forward.
        self.conv_0 = nn.Conv2d(
            in_planes, out_planes, kernel_size=3, stride=stride, padding=1 if stride == 1 else 0, bias=False
        )
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=bn_momentum)
        self.relu_1 = nn.SiLU()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        # RobustBench tests in != out only; stride 2 always comes with a channel change in these nets,
        # and at a width multiplier where it would not, an identity shortcut could not add up.
        self.has_shortcut = in_planes != out_planes or stride != 1
        self.shortcut: nn.Conv2d | None = None
        if self.has_shortcut:
            self.shortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        a = self.relu_0(self.batchnorm_0(x))
        v = a if self.stride == 1 else F.pad(a, (0, 1, 0, 1))
        out = self.conv_1(self.relu_1(self.batchnorm_1(self.conv_0(v))))
        shortcut = x if self.shortcut is None else self.shortcut(a)
        return shortcut + out


class DMBlockGroup(nn.Module):
    """One stage; its blocks live in `.block` so they are named `layer.g.block.i` as in RobustBench."""

    def __init__(
        self, num_blocks: int, in_planes: int, out_planes: int, stride: int, bn_momentum: float
    ) -> None:
        super().__init__()
        self.block = nn.Sequential(
            *[
                DMBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, bn_momentum)
                for i in range(num_blocks)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class DMWideResNet(RobustModel):
    """WRN-depth-k with SiLU: init_conv, layer.0..2 ((depth-4)/6 blocks each), BN-SiLU, pool, `logits`."""

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
        stats: str = "dataset",
        bn_momentum: float = 0.1,
    ) -> None:
        if stats not in STATS_CHOICES:
            raise ConfigError(
                f"model.stats={stats!r} is not allowed; choose one of: {', '.join(STATS_CHOICES)}"
            )
        if stats != "dataset":
            mean, std = DM_STATS[stats]
        super().__init__(num_classes, mean, std, normalize, width)
        if (depth - 4) % 6 != 0:
            raise ConfigError(f"WideResNet depth must be 6n+4, got {depth}")
        self.arch = arch
        self.stats = stats
        n = (depth - 4) // 6
        channels = [
            scale_channels(c, width) for c in (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        ]
        self.init_conv = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            DMBlockGroup(n, channels[0], channels[1], 1, bn_momentum),
            DMBlockGroup(n, channels[1], channels[2], 2, bn_momentum),
            DMBlockGroup(n, channels[2], channels[3], 2, bn_momentum),
        )
        self.batchnorm = nn.BatchNorm2d(channels[3], momentum=bn_momentum)
        self.relu = nn.SiLU()
        self.logits = nn.Linear(channels[3], num_classes)
        self.feature_layers = ["layer.0", "layer.1", "layer.2"]
        self.block_layers = [f"layer.{g}.block.{i}" for g in range(3) for i in range(n)]
        # The DM-Improves-AT training code's initialization (RobustBench's evaluation-only definition
        # keeps PyTorch's defaults): He-normal convs (fan_out), BN weight 1 / bias 0, linear bias 0.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    # The head is registered as `logits` (RobustBench's key); `fc` is the interface every model offers.
    @property
    def fc(self) -> nn.Linear:  # type: ignore[override]
        return self.logits

    def forward_body(self, z: Tensor) -> Tensor:
        out = self.layer(self.init_conv(z))
        return pool_flatten(self.relu(self.batchnorm(out)))


def _register(name: str, depth: int, widen: int) -> None:
    def build(
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: float,
        normalize: str,
        stats: str,
        bn_momentum: float,
    ) -> DMWideResNet:
        return DMWideResNet(
            name, depth, widen, num_classes, mean, std, normalize, width, stats, float(bn_momentum)
        )

    build.__name__ = name
    build.__doc__ = f"WideResNet-{depth}-{widen} with SiLU, RobustBench's DMWideResNet layout."
    MODELS.register(name, schema=DMWideResNetConfig)(build)


for _name, _depth, _widen in DM_WIDE_RESNETS:
    _register(_name, _depth, _widen)
