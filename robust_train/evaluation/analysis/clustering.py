"""`clustering`: clustering-effect accuracy per layer (SAT Def. 1 / Eq. 2, SLIM Table 5).

Class centroids of each layer's flattened output come from the clean *training* images; a test input's
cluster label is the class of the nearest centroid (argmin, L2 by default); the accuracy is measured on
clean test images and on adversarial ones crafted by the suite's attacks against the classifier output.
The computation is robust_train.metrics, shared with SAT's metric (robust_train.addons.sat_metrics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_train.evaluation.analysis.options import analysis_layers, name_list, norm_p, option
from robust_train.metrics import CentroidAccumulator, clustering_hits, layer_centroids

__all__ = ["CentroidAccumulator", "clustering_accuracy_layers", "clustering_section", "layer_centroids"]


def clustering_accuracy_layers(
    model: nn.Module,
    layers: Sequence[str],
    centroids: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    p: float = 2.0,
    batch_size: int = 256,
) -> dict[str, float]:
    """Clu.Acc (%) per layer of inputs x against the centroids, and the classifier's accuracy (%)."""
    correct, classifier = clustering_hits(model, layers, centroids, x, y, p, batch_size)
    n = max(1, x.shape[0])
    return {**{name: 100.0 * c / n for name, c in correct.items()}, "classifier": 100.0 * classifier / n}


def clustering_section(
    model: nn.Module,
    options: Mapping[str, Any] | None,
    inputs: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    train: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    batch_size: int,
    progress: bool,
    plot_path: Path,
    label: str,
) -> tuple[dict[str, Any], Path]:
    """The `clustering` node of the analysis results and its plot."""
    from robust_train.evaluation import plots

    layers = analysis_layers(model, option(options, "clustering", "layers"))
    p = norm_p(option(options, "clustering", "norm"))
    which = option(options, "clustering", "centroids")
    limit = option(options, "clustering", "train_examples")
    tx, ty = train if limit is None else (train[0][: int(limit)], train[1][: int(limit)])
    cents = layer_centroids(model, layers, tx, ty, num_classes, batch_size, which == "correct", progress)
    per_input = {
        name: clustering_accuracy_layers(model, layers, cents, inputs[name], y, p, batch_size)
        for name in name_list(option(options, "clustering", "inputs"), "clustering.inputs")
        if name in inputs
    }
    node = {
        "layers": layers,
        "norm": "inf" if math.isinf(p) else (int(p) if p == int(p) else p),
        "centroids": which,
        "train_examples": int(tx.shape[0]),
        "accuracy": per_input,
    }
    plot = plots.plot_layer_series(
        plot_path, layers,
        {k: [v[layer] for layer in layers] for k, v in per_input.items()},
        f"clustering-effect accuracy ({label or 'model'})", "Clu.Acc (%)", (0, 100),
    )  # fmt: skip
    return node, plot
