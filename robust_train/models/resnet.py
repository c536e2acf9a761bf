"""Post-activation ResNet-18: CIFAR stem (TRADES / MART `models/resnet.py` layout) or the SAT code's stem."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from robust_train.errors import ConfigError
from robust_train.models.base import (
    ModelConfig,
    RobustModel,
    pool_flatten,
    scale_channels,
    sequential_block_names,
)
from robust_train.registry import MODELS

# Stem before layer1 (conv, BN, ReLU in both):
# - conv3x3: 3x3 stride-1 conv, the CIFAR ResNet-18 of TRADES / MART (32x32 input -> layer4 at 4x4);
# - conv7x7_s2: torchvision's 7x7 stride-2 conv (padding 3) *without* its max-pool, the ResNet-18 of the
#   SAT authors' code (spec sat.md d): 32x32 input -> layer4 at 2x2, so SAT's layer4 taps are 512*2*2 =
#   2048-d instead of 8192-d, the size its lambda and beta were tuned on.
STEMS = ("conv3x3", "conv7x7_s2")


class ResNet18Config(ModelConfig):
    stem: Literal["conv3x3", "conv7x7_s2"] = "conv3x3"


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut (1x1 conv + BN when the shape changes), ReLU after the add."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(RobustModel):
    """Stem conv-BN-ReLU (STEMS), 4 stages x 2 BasicBlocks (64/128/256/512), global average pool, Linear."""

    arch = "resnet18"
    # Built with setattr in a loop; declared for type checkers.
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: str = "meanstd",
        width: float = 1.0,
        stem: str = "conv3x3",
    ) -> None:
        super().__init__(num_classes, mean, std, normalize, width)
        if stem not in STEMS:
            raise ConfigError(f"model.stem={stem!r} is not allowed; choose one of: {', '.join(STEMS)}")
        self.stem = stem
        in_planes = scale_channels(64, width)
        # Same module names for both stems (conv1, bn1): only conv1's kernel shape differs, so a checkpoint
        # of the other stem is refused by the shape check instead of loading.
        if stem == "conv7x7_s2":
            self.conv1 = nn.Conv2d(3, in_planes, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, in_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        stages: list[nn.Sequential] = []
        for i, channels in enumerate((64, 128, 256, 512)):
            planes = scale_channels(channels, width)
            stride = 1 if i == 0 else 2
            stage = nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))
            in_planes = planes
            setattr(self, f"layer{i + 1}", stage)
            stages.append(stage)
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_layers = ["layer1", "layer2", "layer3", "layer4"]
        self.block_layers = sequential_block_names(self.feature_layers, stages)

    def forward_body(self, z: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(z)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return pool_flatten(out)


@MODELS.register("resnet18", schema=ResNet18Config)
def resnet18(
    num_classes: int, mean: Sequence[float], std: Sequence[float], width: float, normalize: str, stem: str
) -> ResNet18:
    """Post-activation ResNet-18; `stem` picks the CIFAR 3x3 stem (default) or the SAT code's 7x7/2 one."""
    return ResNet18(num_classes, mean, std, normalize, width, stem)
