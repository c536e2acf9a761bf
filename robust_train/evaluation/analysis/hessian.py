"""`hessian_trace`: Hutchinson estimate of Tr(H_m), the trace of the CE Hessian block of each module's
parameters (docs/methods/slim.md#hessian-trace, HAWQ-V2 style), raw and per parameter. Reported as
measured: no reading of "higher is flatter" is built in (docs/methods/slim.md#hessian-trace).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.errors import ConfigError
from robust_train.evaluation.analysis.options import ANALYSIS_SEED_OFFSET, name_list, option
from robust_train.models.features import resolve_layer


def hessian_modules(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, list[nn.Parameter]]:
    """Parameters of each module whose Hessian block is estimated. Default: every top-level child that
    owns parameters (conv1, layer1..4, bn, fc for the ResNets), in definition order."""
    base = getattr(model, "_orig_mod", model)
    if names:
        modules = {str(n): resolve_layer(model, str(n)) for n in names}
    else:
        modules = dict(base.named_children())
    out = {name: [p for p in m.parameters() if p.dtype.is_floating_point] for name, m in modules.items()}
    out = {name: ps for name, ps in out.items() if ps}
    if not out:
        raise ConfigError("analysis_options.hessian_trace.modules selects no module with parameters")
    return out


def hutchinson_traces(
    model: nn.Module,
    modules: Mapping[str, Sequence[nn.Parameter]],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    samples: int,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Tr(H_m) of the batch-mean CE loss w.r.t. each module's parameters, estimated with Hutchinson's
    identity E_v[v^T H_m v] = Tr(H_m) for Rademacher v, averaged over `samples` draws and the batches.

    Each module gets its own draws and Hessian-vector products (double backward), so the estimate is
    of the diagonal block H_m, not of v^T H v over the whole network. Per module: `trace`, `avg_trace`
    (= trace / #params), `n_params` and the standard error of the trace estimate.
    """
    if samples < 1 or not batches:
        raise ValueError("hutchinson_traces needs samples >= 1 and at least one batch")
    params_all = list(dict.fromkeys(p for ps in modules.values() for p in ps))
    device = params_all[0].device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    draws: dict[str, list[float]] = {name: [] for name in modules}
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params_all:
            p.requires_grad_(True)
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params_all, create_graph=True, allow_unused=True)
            grad_of = dict(zip(params_all, grads, strict=True))
            for name, params in modules.items():
                # Parameters the loss does not reach, or reaches linearly, have a zero Hessian block.
                pairs = [
                    (p, grad_of[p]) for p in params if grad_of[p] is not None and grad_of[p].requires_grad
                ]
                for _ in range(samples):
                    if not pairs:
                        draws[name].append(0.0)
                        continue
                    vs = [
                        torch.randint(0, 2, p.shape, generator=gen, device=device).to(p.dtype).mul_(2).sub_(1)
                        for p, _ in pairs
                    ]
                    hvs = torch.autograd.grad(
                        [g for _, g in pairs], [p for p, _ in pairs], grad_outputs=vs,
                        retain_graph=True, allow_unused=True,
                    )  # fmt: skip
                    est = sum(float((v * h).sum()) for v, h in zip(vs, hvs, strict=True) if h is not None)
                    draws[name].append(est)
            del loss, grads, grad_of
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, flag in flags:
            p.requires_grad_(flag)
    out: dict[str, dict[str, float]] = {}
    for name, params in modules.items():
        values = torch.tensor(draws[name], dtype=torch.float64)
        n_params = sum(p.numel() for p in params)
        trace = float(values.mean())
        err = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        out[name] = {"trace": trace, "avg_trace": trace / n_params, "n_params": n_params, "std_err": err}
    return out


def hessian_section(
    model: nn.Module,
    options: Mapping[str, Any] | None,
    inputs: Mapping[str, torch.Tensor],
    y: torch.Tensor,
    seed: int,
    plot_path: Path,
    label: str,
) -> tuple[dict[str, Any], Path]:
    """The `hessian_trace` node of the analysis results and its plot."""
    from robust_train.evaluation import plots

    modules = hessian_modules(model, option(options, "hessian_trace", "modules"))
    hb = int(option(options, "hessian_trace", "batch_size"))
    n_batches = int(option(options, "hessian_trace", "batches"))
    samples = int(option(options, "hessian_trace", "samples"))
    traces: dict[str, Any] = {}
    for name in name_list(option(options, "hessian_trace", "inputs"), "hessian_trace.inputs"):
        if name not in inputs:
            continue
        xs = inputs[name]
        batches = [(xs[i : i + hb], y[i : i + hb]) for i in range(0, min(xs.shape[0], hb * n_batches), hb)]
        per_module = hutchinson_traces(
            model, modules, batches, samples, seed=int(seed) + ANALYSIS_SEED_OFFSET
        )
        total_params = sum(v["n_params"] for v in per_module.values())
        total = sum(v["trace"] for v in per_module.values())
        traces[name] = {
            "modules": per_module,
            "sum": {"trace": total, "avg_trace": total / max(1, total_params), "n_params": total_params},
            "n_examples": sum(int(b[0].shape[0]) for b in batches),
        }
    node = {"samples": samples, "batch_size": hb, "batches": n_batches, "inputs": traces}
    plot = plots.plot_module_bars(
        plot_path, list(modules),
        {k: [v["modules"][m]["avg_trace"] for m in modules] for k, v in traces.items()},
        f"average module-wise Hessian trace ({label or 'model'})", "Tr(H_m) / #params",
    )  # fmt: skip
    return node, plot
