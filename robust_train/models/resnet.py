"""Post-activation ResNet-18, CIFAR stem (TRADES / MART `models/resnet.py` layout)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from robust_train.models.base import RobustModel, pool_flatten, scale_channels, sequential_block_names


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
    """Stem conv3x3+BN+ReLU, 4 stages x 2 BasicBlocks (64/128/256/512), global average pool, Linear."""

    arch = "resnet18"

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: str = "meanstd",
        width: float = 1.0,
    ) -> None:
        super().__init__(num_classes, mean, std, normalize, width)
        in_planes = scale_channels(64, width)
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


def resnet18(
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float = 1.0,
    normalize: str = "meanstd",
) -> ResNet18:
    """Post-activation ResNet-18 (CIFAR stem)."""
    return ResNet18(num_classes, mean, std, normalize, width)
