"""MobileNetV2, CIFAR variant: stride 1 in the stem and in the first strided bottleneck sequence."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from robust_train.models.base import (
    ModelConfig,
    RobustModel,
    pool_flatten,
    scale_channels,
    sequential_block_names,
)
from robust_train.registry import MODELS

# Bottleneck sequences (expansion t, out channels c, repeats n, first stride s) of Sandler et al.
# (2018, Table 2), grouped into stages by output resolution at 32x32 input: 32, 16, 8, 4.
# The ImageNet strides of the stem and of the (6, 24) sequence are 2; CIFAR uses 1.
MOBILENET_V2_STAGES: tuple[tuple[tuple[int, int, int, int], ...], ...] = (
    ((1, 16, 1, 1), (6, 24, 2, 1)),
    ((6, 32, 3, 2),),
    ((6, 64, 4, 2), (6, 96, 3, 1)),
    ((6, 160, 3, 2), (6, 320, 1, 1)),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t=1) -> 3x3 depthwise -> 1x1 linear projection; residual when shapes match."""

    def __init__(self, in_planes: int, planes: int, hidden: int, stride: int, expand: bool) -> None:
        super().__init__()
        self.conv1: nn.Conv2d | None = None
        self.bn1: nn.BatchNorm2d | None = None
        if expand:
            self.conv1 = nn.Conv2d(in_planes, hidden, kernel_size=1, bias=False)
            self.bn1 = nn.BatchNorm2d(hidden)
        else:
            hidden = in_planes
        self.conv2 = nn.Conv2d(
            hidden, hidden, kernel_size=3, stride=stride, padding=1, groups=hidden, bias=False
        )
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU6()
        self.use_residual = stride == 1 and in_planes == planes

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.conv1 is not None and self.bn1 is not None:
            out = self.relu(self.bn1(self.conv1(out)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + x if self.use_residual else out


class MobileNetV2(RobustModel):
    """conv1-bn1 stem, stage1..stage4 of inverted residuals, 1x1 conv2-bn2 to 1280, pool, fc."""

    arch = "mobilenet_v2"

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: str = "meanstd",
        width: float = 1.0,
    ) -> None:
        super().__init__(num_classes, mean, std, normalize, width)
        in_c = STEM_CHANNELS  # unscaled, so the expanded width is scale(t * c) like every other count
        in_planes = scale_channels(in_c, width)
        self.conv1 = nn.Conv2d(3, in_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU6()
        stages: list[nn.Sequential] = []
        for i, sequences in enumerate(MOBILENET_V2_STAGES):
            blocks: list[nn.Module] = []
            for t, c, n, s in sequences:
                for j in range(n):
                    planes = scale_channels(c, width)
                    hidden = scale_channels(in_c * t, width)
                    blocks.append(
                        InvertedResidual(in_planes, planes, hidden, s if j == 0 else 1, expand=t != 1)
                    )
                    in_c, in_planes = c, planes
            stage = nn.Sequential(*blocks)
            setattr(self, f"stage{i + 1}", stage)
            stages.append(stage)
        last = scale_channels(LAST_CHANNELS, width)
        self.conv2 = nn.Conv2d(in_planes, last, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(last)
        self.fc = nn.Linear(last, num_classes)
        self.feature_layers = [f"stage{i + 1}" for i in range(len(stages))]
        self.block_layers = sequential_block_names(self.feature_layers, stages)

    def forward_body(self, z: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(z)))
        for name in self.feature_layers:
            out = getattr(self, name)(out)
        out = self.relu(self.bn2(self.conv2(out)))
        return pool_flatten(out)


@MODELS.register("mobilenet_v2", schema=ModelConfig)
def mobilenet_v2(
    num_classes: int, mean: Sequence[float], std: Sequence[float], width: float, normalize: str
) -> MobileNetV2:
    """MobileNetV2 for 32x32 / 64x64 input."""
    return MobileNetV2(num_classes, mean, std, normalize, width)
