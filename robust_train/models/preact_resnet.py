"""Pre-activation ResNets: PreActResNet-18 (robust_overfitting / AWP layout) and PreActResNet-56."""

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

# What the projection shortcut (1x1 conv) reads: `preact` = relu(bn1(x)) as in the robust_overfitting /
# AWP PreActResNet-18; `raw` = the block input x as in the ISEAT authors' PreActResNet-18 (spec iseat.md,
# official code notes). Identity shortcuts always add the raw input.
SHORTCUT_INPUTS = ("preact", "raw")


class PreActResNet18Config(ModelConfig):
    # Same parameters and checkpoint keys either way.
    shortcut_input: Literal["preact", "raw"] = "preact"


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv; the projection shortcut (1x1 conv, no BN) reads `shortcut_input`."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut_input: str = "preact") -> None:
        super().__init__()
        if shortcut_input not in SHORTCUT_INPUTS:
            raise ConfigError(
                f"model.shortcut_input={shortcut_input!r} is not allowed; choose one of: "
                f"{', '.join(SHORTCUT_INPUTS)}"
            )
        self.shortcut_input = shortcut_input
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            # Sequential keeps the reference key names (`shortcut.0.weight`).
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(x if self.shortcut_input == "raw" else a)
        out = self.conv1(a)
        out = self.conv2(F.relu(self.bn2(out)))
        # Out of place: a hook may hold conv2's output.
        return out + shortcut

    def extra_repr(self) -> str:
        return f"shortcut_input={self.shortcut_input}" if self.shortcut is not None else ""


class PreActResNet(RobustModel):
    """Stem conv (no BN/ReLU), pre-activation stages, final BN-ReLU, global average pool, Linear."""

    def __init__(
        self,
        arch: str,
        stem_channels: int,
        stage_channels: Sequence[int],
        stage_blocks: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: str = "meanstd",
        width: float = 1.0,
        shortcut_input: str = "preact",
    ) -> None:
        super().__init__(num_classes, mean, std, normalize, width)
        self.arch = arch
        self.shortcut_input = shortcut_input
        in_planes = scale_channels(stem_channels, width)
        self.conv1 = nn.Conv2d(3, in_planes, kernel_size=3, stride=1, padding=1, bias=False)
        names: list[str] = []
        stages: list[nn.Sequential] = []
        for i, (channels, blocks) in enumerate(zip(stage_channels, stage_blocks, strict=True)):
            planes = scale_channels(channels, width)
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(PreActBlock(in_planes, planes, stride, shortcut_input))
                in_planes = planes
            stage = nn.Sequential(*layers)
            name = f"layer{i + 1}"
            setattr(self, name, stage)
            names.append(name)
            stages.append(stage)
        self._stage_names = names
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.feature_layers = list(names)
        self.block_layers = sequential_block_names(names, stages)

    def forward_body(self, z: Tensor) -> Tensor:
        out = self.conv1(z)
        for name in self._stage_names:
            out = getattr(self, name)(out)
        return pool_flatten(F.relu(self.bn(out)))


@MODELS.register("preact_resnet18", schema=PreActResNet18Config)
def preact_resnet18(
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float,
    normalize: str,
    shortcut_input: str,
) -> PreActResNet:
    """PreActResNet-18: 64-ch stem, 4 stages x 2 blocks (64/128/256/512).

    `shortcut_input` (see SHORTCUT_INPUTS) changes only the forward: the parameters and state_dict keys
    are the same, so checkpoints of either variant load into the other (and silently compute something
    else; the run config records the option).
    """
    return PreActResNet(
        "preact_resnet18",
        64,
        (64, 128, 256, 512),
        (2, 2, 2, 2),
        num_classes,
        mean,
        std,
        normalize,
        width,
        shortcut_input,
    )


@MODELS.register("preact_resnet56", schema=ModelConfig)
def preact_resnet56(
    num_classes: int, mean: Sequence[float], std: Sequence[float], width: float, normalize: str
) -> PreActResNet:
    """PreActResNet-56 (LAD): 16-ch stem, 3 stages x 9 blocks (16/32/64)."""
    return PreActResNet(
        "preact_resnet56", 16, (16, 32, 64), (9, 9, 9), num_classes, mean, std, normalize, width
    )


class WongPreActResNet18(RobustModel):
    """RobustBench's `Wong2020FastNet` (Wong et al. 2020, "Fast is better than free"): PreActResNet-18
    whose projection shortcuts read the raw block input, with no BN-ReLU after the last stage, and the
    head named `linear`. Its state_dict keys are RobustBench's (conv1, layer1..4, linear); the
    normalization (CIFAR-10 statistics in RobustBench's `mu`/`sigma`) is our non-persistent Normalize.
    """

    def __init__(
        self,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: str = "meanstd",
        width: float = 1.0,
    ) -> None:
        super().__init__(num_classes, mean, std, normalize, width)
        self.arch = "preact_resnet18_wong"
        in_planes = scale_channels(64, width)
        self.conv1 = nn.Conv2d(3, in_planes, kernel_size=3, stride=1, padding=1, bias=False)
        names: list[str] = []
        stages: list[nn.Sequential] = []
        for i, channels in enumerate((64, 128, 256, 512)):
            planes = scale_channels(channels, width)
            stage = nn.Sequential(
                PreActBlock(in_planes, planes, 2 if i > 0 else 1, "raw"),
                PreActBlock(planes, planes, 1, "raw"),
            )
            in_planes = planes
            name = f"layer{i + 1}"
            setattr(self, name, stage)
            names.append(name)
            stages.append(stage)
        self._stage_names = names
        self.linear = nn.Linear(in_planes, num_classes)
        self.feature_layers = list(names)
        self.block_layers = sequential_block_names(names, stages)

    # The head is registered as `linear` (RobustBench's key); `fc` is the interface every model offers.
    @property
    def fc(self) -> nn.Linear:  # type: ignore[override]
        return self.linear

    def forward_body(self, z: Tensor) -> Tensor:
        out = self.conv1(z)
        for name in self._stage_names:
            out = getattr(self, name)(out)
        # No BN-ReLU here: the last block's sum is pooled directly.
        return pool_flatten(out)


@MODELS.register("preact_resnet18_wong", schema=ModelConfig)
def preact_resnet18_wong(
    num_classes: int, mean: Sequence[float], std: Sequence[float], width: float, normalize: str
) -> WongPreActResNet18:
    """PreActResNet-18 as RobustBench's Wong2020Fast (raw-input shortcuts, no final BN, `linear`)."""
    return WongPreActResNet18(num_classes, mean, std, normalize, width)
