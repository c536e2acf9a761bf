"""CIFAR VGG16-BN: 13 conv3x3-BN-ReLU units in 5 max-pooled stages, then a single Linear(512 -> K)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from robust_train.models.base import ModelConfig, RobustModel, pool_flatten, scale_channels
from robust_train.registry import MODELS

# Output channels of the conv units of each stage; every stage ends with a 2x2 max-pool.
VGG16_STAGES: tuple[tuple[int, ...], ...] = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)


class ConvBNReLU(nn.Module):
    """conv3x3 (with bias, as in the common CIFAR VGG) -> BN -> ReLU."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class VGG16BN(RobustModel):
    """stage1..stage5 (conv units then max-pool), global average pool, fc.

    At 32x32 the last pool leaves 1x1, so the average pool is a no-op there; at 64x64 it averages 2x2.
    """

    arch = "vgg16_bn"

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: str = "meanstd",
        width: float = 1.0,
    ) -> None:
        super().__init__(num_classes, mean, std, normalize, width)
        in_planes = 3
        self.feature_layers = []
        self.block_layers = []
        for i, stage_channels in enumerate(VGG16_STAGES):
            name = f"stage{i + 1}"
            units: list[nn.Module] = []
            for j, channels in enumerate(stage_channels):
                planes = scale_channels(channels, width)
                units.append(ConvBNReLU(in_planes, planes))
                in_planes = planes
                self.block_layers.append(f"{name}.{j}")
            units.append(nn.MaxPool2d(kernel_size=2, stride=2))
            setattr(self, name, nn.Sequential(*units))
            self.feature_layers.append(name)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward_body(self, z: Tensor) -> Tensor:
        out = z
        for name in self.feature_layers:
            out = getattr(self, name)(out)
        return pool_flatten(out)


@MODELS.register("vgg16_bn", schema=ModelConfig)
def vgg16_bn(
    num_classes: int, mean: Sequence[float], std: Sequence[float], width: float, normalize: str
) -> VGG16BN:
    """CIFAR VGG16-BN with a single linear classifier."""
    return VGG16BN(num_classes, mean, std, normalize, width)
