"""`run_analysis`: the requested analyses of one checkpoint on shared inputs, with their plots."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_train.attacks import Attack
from robust_train.evaluation.analysis.clustering import clustering_section
from robust_train.evaluation.analysis.hessian import hessian_section
from robust_train.evaluation.analysis.inputs import analysis_inputs
from robust_train.evaluation.analysis.options import (
    ANALYSIS_SEED_OFFSET,
    name_list,
    option,
    validate_analysis,
)
from robust_train.evaluation.analysis.shift import layer_shift_section


def run_analysis(
    model: nn.Module,
    names: Sequence[str],
    options: Mapping[str, Any] | None,
    attacks: Mapping[str, Attack],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    out_dir: Path,
    label: str = "",
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the named analyses (robust_overfitting excepted: it needs the suite, see `evaluate_sibling`)
    on the first `n_examples` test images; plots go to out_dir/analysis_<name>[_<label>].png.

    `attacks` are the suite's attacks by name; inputs named in the options but absent from the suite
    are skipped and listed under `skipped`. `model` is the plain network (no eval-time wrappers: the
    hooks need its layers).
    """
    names = validate_analysis(names, options)
    n = option(options, "n_examples")
    bs = int(option(options, "batch_size") or batch_size)
    x, y = test if n is None else (test[0][: int(n)], test[1][: int(n)])
    out_dir = Path(out_dir)
    suffix = f"_{label}" if label else ""
    result: dict[str, Any] = {
        "checkpoint": label,
        "n_examples": int(x.shape[0]),
        "batch_size": bs,
        "plots": {},
    }
    if not {"clustering", "hessian_trace", "layer_shift"} & set(names):
        return result
    torch.manual_seed(int(seed) + ANALYSIS_SEED_OFFSET)

    # Every analysis reads the same crafted inputs: each attack runs once, in the order first named.
    wanted: list[str] = []
    if "clustering" in names:
        wanted += name_list(option(options, "clustering", "inputs"), "clustering.inputs")
    if "hessian_trace" in names:
        wanted += name_list(option(options, "hessian_trace", "inputs"), "hessian_trace.inputs")
    if "layer_shift" in names:
        wanted += name_list(option(options, "layer_shift", "attacks"), "layer_shift.attacks")
    inputs, skipped = analysis_inputs(model, wanted, attacks, x, y, bs, progress)
    result["inputs"] = list(inputs)
    result["skipped"] = skipped

    def plot_path(name: str) -> Path:
        return out_dir / f"analysis_{name}{suffix}.png"

    if "clustering" in names:
        result["clustering"], plot = clustering_section(
            model, options, inputs, y, train, num_classes, bs, progress, plot_path("clustering"), label
        )
        result["plots"]["clustering"] = str(plot)
    if "hessian_trace" in names:
        result["hessian_trace"], plot = hessian_section(
            model, options, inputs, y, seed, plot_path("hessian_trace"), label
        )
        result["plots"]["hessian_trace"] = str(plot)
    if "layer_shift" in names:
        result["layer_shift"], plot = layer_shift_section(
            model, options, inputs, x, bs, plot_path("layer_shift"), label
        )
        result["plots"]["layer_shift"] = str(plot)
    return result
