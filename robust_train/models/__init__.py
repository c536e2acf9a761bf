"""Architectures (CIFAR / Tiny-ImageNet variants) behind one builder, plus feature capture."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from robust_train.errors import CheckpointError, ConfigError
from robust_train.models.base import NORMALIZE_MODES, Normalize, RobustModel, scale_channels
from robust_train.models.features import capture_features, forward_with_features, resolve_layer
from robust_train.models.mobilenet import mobilenet_v2
from robust_train.models.preact_resnet import preact_resnet18, preact_resnet56
from robust_train.models.resnet import resnet18
from robust_train.models.vgg import vgg16_bn
from robust_train.models.wide_resnet import filter_state_dict, wrn28_10, wrn34_10

_BUILDERS: dict[str, Callable[..., RobustModel]] = {
    "preact_resnet18": preact_resnet18,
    "resnet18": resnet18,
    "wrn34_10": wrn34_10,
    "wrn28_10": wrn28_10,
    "preact_resnet56": preact_resnet56,
    "vgg16_bn": vgg16_bn,
    "mobilenet_v2": mobilenet_v2,
}
MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)
_COMMON_ARGS = {"num_classes", "mean", "std", "width", "normalize"}

__all__ = [
    "MODEL_NAMES",
    "Normalize",
    "RobustModel",
    "build_model",
    "capture_features",
    "check_state_dict_compatible",
    "count_parameters",
    "filter_state_dict",
    "forward_with_features",
    "resolve_layer",
    "scale_channels",
]


def build_model(
    name: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float = 1.0,
    normalize: str = "meanstd",
    **kwargs: Any,
) -> RobustModel:
    """Build a model taking [0, 1] images and returning logits; kwargs are arch-specific options."""
    if name not in _BUILDERS:
        raise ConfigError(f"model.name={name!r} is not a known model; allowed: {', '.join(MODEL_NAMES)}")
    if normalize not in NORMALIZE_MODES:
        raise ConfigError(
            f"model.normalize={normalize!r} is not known; allowed: {', '.join(NORMALIZE_MODES)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} must be a positive integer")
    if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
        raise ConfigError(f"model.width={width!r} must be a number > 0")
    builder = _BUILDERS[name]
    extra = [p for p in inspect.signature(builder).parameters if p not in _COMMON_ARGS]
    unknown = sorted(set(kwargs) - set(extra))
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]} is not an option of model {name!r}; allowed extra options: "
            f"{', '.join(extra) if extra else '(none)'}"
        )
    return builder(
        num_classes=num_classes,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        width=float(width),
        normalize=normalize,
        **kwargs,
    )


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN statistics and Normalize excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _preview(keys: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > limit else shown


def check_state_dict_compatible(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Raise CheckpointError unless `state_dict` has exactly the model's keys and shapes.

    A missing `num_batches_tracked` is tolerated (old checkpoints; load_state_dict fills it in).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and isinstance(v, Tensor) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mis_shaped):
        return
    arch = getattr(model, "arch", type(model).__name__)
    parts = []
    if missing:
        parts.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_preview(unexpected)}")
    if mis_shaped:
        parts.append(f"shape mismatch: {_preview(mis_shaped)}")
    raise CheckpointError(
        f"{source}: weights do not fit model '{arch}' (other architecture, width or num_classes?); "
        + "; ".join(parts)
    )
