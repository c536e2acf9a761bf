"""The analysis names, `analysis_options` defaults and their validation, and layer selection."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from robust_train.errors import ConfigError
from robust_train.models.features import known_layer_names, resolve_layer

ANALYSES = ("clustering", "hessian_trace", "layer_shift", "robust_overfitting")
CENTROID_SETS = ("all", "correct")
LAYER_SETS = ("stage", "block")
# Offset of the analysis seed from the run seed: attack starts and Rademacher draws of the analysis
# never share a stream with anything the suite drew.
ANALYSIS_SEED_OFFSET = 7_919

# Defaults of `analysis_options` (mirrors conf/evaluate.yaml, for callers that pass a partial node).
DEFAULTS: dict[str, Any] = {
    "n_examples": 512,
    "batch_size": None,
    "clustering": {
        "inputs": ["clean", "pgd20", "lafeat"],
        "layers": "stage",
        "norm": 2,
        "centroids": "all",
        "train_examples": None,
    },
    "hessian_trace": {
        "inputs": ["clean", "pgd20"],
        "modules": None,
        "samples": 32,
        "batches": 2,
        "batch_size": 64,
    },
    "layer_shift": {"attacks": ["pgd20", "lafeat"], "layers": "block"},
}


def option(options: Mapping[str, Any] | None, *keys: str) -> Any:
    """options[k1][k2]..., falling back to DEFAULTS where the caller's node lacks the key (an explicit
    null is kept: `n_examples: null` means all examples)."""
    node: Any = options
    for key in keys:
        if node is None or not hasattr(node, "get") or key not in node:
            default: Any = DEFAULTS
            for k in keys:
                default = default.get(k) if isinstance(default, Mapping) else None
            return default
        node = node.get(key)
    return node


def norm_p(value: Any) -> float:
    """The clustering norm as a number p >= 1 (inf for 'inf', 'linf')."""
    text = str(value).strip().lower()
    if text in ("inf", "linf", "infinity"):
        return math.inf
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not p >= 1.0:
        raise ConfigError(f"analysis_options.clustering.norm={value!r} is not allowed; choose 1, 2 or inf")
    return p


def positive_int(value: Any, key: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer" + (" or null" if optional else ""))
    return int(value)


def name_list(value: Any, key: str) -> list[str]:
    """A list of names from the config (one bare name is allowed for `analysis` only)."""
    if value is None:
        return []
    if isinstance(value, str) and key == "analysis":
        return [value]  # analysis=clustering: one name without brackets
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{key}={value!r} must be a list of names, e.g. [clean, pgd20]")
    return [str(v) for v in value]


def validate_analysis(names: Any, options: Mapping[str, Any] | None = None) -> list[str]:
    """The requested analysis names in order, without duplicates; ConfigError on an unknown name or a
    bad option (checked before the checkpoint is read)."""
    requested = name_list(names, "analysis")
    bad = [n for n in requested if n not in ANALYSES]
    if bad:
        raise ConfigError(f"analysis={bad[0]!r} is not a known analysis; allowed: {', '.join(ANALYSES)}")
    positive_int(option(options, "n_examples"), "analysis_options.n_examples", optional=True)
    positive_int(option(options, "batch_size"), "analysis_options.batch_size", optional=True)
    norm_p(option(options, "clustering", "norm"))
    if option(options, "clustering", "centroids") not in CENTROID_SETS:
        raise ConfigError(
            f"analysis_options.clustering.centroids={option(options, 'clustering', 'centroids')!r} is not "
            f"allowed; choose one of: {', '.join(CENTROID_SETS)}"
        )
    positive_int(
        option(options, "clustering", "train_examples"), "analysis_options.clustering.train_examples", True
    )
    for key in ("samples", "batches", "batch_size"):
        positive_int(option(options, "hessian_trace", key), f"analysis_options.hessian_trace.{key}")
    name_list(option(options, "clustering", "inputs"), "analysis_options.clustering.inputs")
    name_list(option(options, "hessian_trace", "inputs"), "analysis_options.hessian_trace.inputs")
    name_list(option(options, "layer_shift", "attacks"), "analysis_options.layer_shift.attacks")
    for group in ("clustering", "layer_shift"):
        layers = option(options, group, "layers")
        if isinstance(layers, str) and layers not in LAYER_SETS:
            raise ConfigError(
                f"analysis_options.{group}.layers={layers!r} is not allowed; choose one of: "
                f"{', '.join(LAYER_SETS)} or a list of layer names"
            )
    return list(dict.fromkeys(requested))


def analysis_layers(model: nn.Module, layers: Any) -> list[str]:
    """'stage' -> the model's stage outputs, 'block' -> its block outputs (stage outputs when it declares
    none), a list -> those submodules (checked, ConfigError naming the known layers)."""
    base = getattr(model, "_orig_mod", model)
    if isinstance(layers, str):
        if layers not in LAYER_SETS:
            raise ConfigError(f"layers={layers!r} is not allowed; choose one of: {', '.join(LAYER_SETS)}")
        names = list(getattr(base, "block_layers" if layers == "block" else "feature_layers", []) or [])
        names = names or list(getattr(base, "feature_layers", []) or []) or known_layer_names(model)
    else:
        names = [str(n) for n in layers]
    for name in names:
        resolve_layer(model, name)
    return names
