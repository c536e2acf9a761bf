"""Architectures (CIFAR / Tiny-ImageNet variants) behind one builder, plus feature capture."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from robust_train.errors import CheckpointError, ConfigError
from robust_train.models.base import (
    NORMALIZE_MODES,
    NOT_BUILDER_OPTIONS,
    ModelConfig,
    Normalize,
    RobustModel,
    scale_channels,
)
from robust_train.models.dm_wide_resnet import DM_WIDE_RESNETS, DMWideResNetConfig
from robust_train.models.features import capture_features, forward_with_features, resolve_layer
from robust_train.models.mobilenet import mobilenet_v2  # noqa: F401  (each module registers its models)
from robust_train.models.preact_resnet import PreActResNet18Config
from robust_train.models.resnet import ResNet18Config
from robust_train.models.vgg import vgg16_bn  # noqa: F401
from robust_train.models.wide_resnet import WideResNetConfig, filter_state_dict
from robust_train.registry import MODELS
from robust_train.schema import check_node, did_you_mean, plain, raise_problems

# The package's own architectures (each registered in MODELS by its module); plugins add more.
MODEL_NAMES: tuple[str, ...] = (
    "preact_resnet18",
    "resnet18",
    "wrn34_10",
    "wrn28_10",
    "preact_resnet56",
    "vgg16_bn",
    "mobilenet_v2",
    "wrn34_20",
    "preact_resnet18_wong",
    *(name for name, _, _ in DM_WIDE_RESNETS),
)

__all__ = [
    "MODEL_NAMES",
    "NORMALIZE_MODES",
    "NOT_BUILDER_OPTIONS",
    "DMWideResNetConfig",
    "ModelConfig",
    "Normalize",
    "PreActResNet18Config",
    "ResNet18Config",
    "RobustModel",
    "WideResNetConfig",
    "build_model",
    "capture_features",
    "check_model",
    "check_state_dict_compatible",
    "count_parameters",
    "filter_state_dict",
    "forward_with_features",
    "model_names",
    "resolve_layer",
    "scale_channels",
]


def model_names() -> list[str]:
    """Every selectable architecture: ours in their usual order, then the plugins'."""
    return [*MODEL_NAMES, *(n for n in MODELS.names() if n not in MODEL_NAMES)]


def check_model(node: Any, path: str = "model") -> tuple[ModelConfig | None, list[str]]:
    """A `model` node validated by its architecture's schema, or the problems found.

    A key that is an option of another architecture (or of none) is named as "not an option of model
    X", with the closest option of X.
    """
    if isinstance(node, ModelConfig):
        return check_node(type(node), node, path)
    data = plain(node) or {}
    name = data.get("name") if isinstance(data, Mapping) else None
    if not isinstance(name, str) or name not in MODELS:
        names = model_names()
        close = did_you_mean(str(name), names)
        return None, [f"{path}.name={name!r} is not a known model; allowed: {', '.join(names)}{close}"]
    schema = MODELS.get(name).schema
    options = [k for k in schema.model_fields if k != "name"]
    unknown = [k for k in data if k not in schema.model_fields]
    problems = [
        f"{path}.{k} is not an option of model {name!r}{did_you_mean(k, options, f'{path}.')}; "
        f"allowed options: {', '.join(options)}"
        for k in unknown
    ]
    cfg, more = check_node(schema, {k: v for k, v in data.items() if k not in unknown}, path)
    problems += more
    return (None, problems) if problems else (cfg, [])


def build_model(
    name: str,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: float | None = None,
    normalize: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a model taking [0, 1] images and returning logits; kwargs are arch-specific options.

    `width` and `normalize` left out (None) take the architecture schema's defaults.
    """
    node = {"name": name, **kwargs}
    if width is not None:
        node["width"] = width
    if normalize is not None:
        node["normalize"] = normalize
    cfg, problems = check_model(node)
    raise_problems(problems)
    assert cfg is not None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} must be a positive integer")
    return MODELS.get(cfg.name).cls(
        num_classes=num_classes,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        **cfg.options(),
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
