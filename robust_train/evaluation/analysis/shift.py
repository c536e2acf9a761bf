"""`layer_shift`: per layer, ||f_l(x_adv) - f_l(x)||_2 / ||f_l(x)||_2 per example (mean, median) and the
mean cosine between clean and adversarial features (SLIM Fig. 2, docs/methods/sat.md#lambda-search).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks import attack_mode
from robust_train.data import to_float
from robust_train.evaluation.analysis.options import analysis_layers, name_list, option
from robust_train.metrics import float_batches
from robust_train.models.features import capture_features


@torch.no_grad()
def layer_shift(
    model: nn.Module,
    layers: Sequence[str],
    x: torch.Tensor,
    x_adv: torch.Tensor,
    batch_size: int = 256,
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Per layer l and example i, r_i = ||f_l(x_adv_i) - f_l(x_i)||_2 / ||f_l(x_i)||_2 and the cosine of the
    two flattened features. Returns ({layer: mean/median/std of r, mean cosine}, {layer: r per example})."""
    rel: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    cos: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    with attack_mode(model, "eval"), capture_features(model, layers, detach=True) as feats:
        for i, xb in float_batches(x, batch_size):
            model(xb)
            clean = {n: feats[n].flatten(1).double() for n in layers}
            xa = x_adv[i : i + batch_size]
            model(to_float(xa) if xa.dtype == torch.uint8 else xa)
            for n in layers:
                adv = feats[n].flatten(1).double()
                rel[n].append((adv - clean[n]).norm(dim=1) / clean[n].norm(dim=1).clamp_min(1e-12))
                cos[n].append(F.cosine_similarity(adv, clean[n], dim=1, eps=1e-12))
    per_example = {n: torch.cat(rel[n]).cpu() for n in layers}
    summary = {}
    for n in layers:
        r, c = per_example[n], torch.cat(cos[n]).cpu()
        summary[n] = {
            "rel_shift_mean": float(r.mean()),
            "rel_shift_median": float(r.median()),
            "rel_shift_std": float(r.std(unbiased=False)),
            "cosine_mean": float(c.mean()),
        }
    return summary, per_example


def layer_shift_section(
    model: nn.Module,
    options: Mapping[str, Any] | None,
    inputs: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    batch_size: int,
    plot_path: Path,
    label: str,
) -> tuple[dict[str, Any], Path]:
    """The `layer_shift` node of the analysis results and its plot (clean inputs: `x` when 'clean' was
    not among the analysis inputs)."""
    from robust_train.evaluation import plots

    layers = analysis_layers(model, option(options, "layer_shift", "layers"))
    shifts: dict[str, Any] = {}
    last_samples = {}
    for name in name_list(option(options, "layer_shift", "attacks"), "layer_shift.attacks"):
        if name not in inputs or name == "clean":
            continue
        summary, per_example = layer_shift(
            model, layers, inputs["clean"] if "clean" in inputs else x, inputs[name], batch_size
        )
        shifts[name] = summary
        last_samples[name] = per_example[layers[-1]].numpy()
    plot = plots.plot_layer_shift(
        plot_path, layers,
        {k: [v[layer]["rel_shift_mean"] for layer in layers] for k, v in shifts.items()},
        last_samples, f"relative feature shift per layer ({label or 'model'})",
    )  # fmt: skip
    return {"layers": layers, "attacks": shifts}, plot
