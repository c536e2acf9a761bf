"""PNG figures of the analysis metrics, drawn with matplotlib's Agg canvas.

Figures are built with `matplotlib.figure.Figure` directly (no pyplot), so no global backend or figure
registry is touched and plotting works on headless machines and inside long-running processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from robust_train.io import atomic_write


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    path = Path(path)
    # Written through a temp file so that a reader (W&B's file sync) never sees half a PNG.
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path


def _layer_axis(ax, layers: Sequence[str]) -> None:
    ax.set_xticks(range(len(layers)))
    # Block-level names get long (layer3.1); rotate when there are many.
    ax.set_xticklabels(
        layers, rotation=45 if len(layers) > 6 else 0, ha="right" if len(layers) > 6 else "center"
    )
    ax.set_xlabel("layer")
    ax.grid(True, alpha=0.3)


def plot_layer_series(
    path: Path,
    layers: Sequence[str],
    series: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One line per entry of `series` (values aligned with `layers`), layers on the x axis."""
    fig = Figure(figsize=(max(5.0, 0.45 * len(layers) + 3), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    _draw_layer_lines(ax, layers, series, title, ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    return _save(fig, path)


def _draw_layer_lines(
    ax: Any, layers: Sequence[str], series: Mapping[str, Sequence[float]], title: str, ylabel: str
) -> None:
    for name, values in series.items():
        ax.plot(range(len(layers)), list(values), marker="o", label=name)
    _layer_axis(ax, layers)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize="small")


def plot_layer_shift(
    path: Path,
    layers: Sequence[str],
    mean_shift: Mapping[str, Sequence[float]],
    last_layer_samples: Mapping[str, np.ndarray],
    title: str,
) -> Path:
    """Left: mean relative feature shift per layer, one line per attack. Right: the per-example shift at
    the last layer as histograms (SAT's diagnostic (i): PGD vs LAFEAT at the deepest tap)."""
    fig = Figure(figsize=(max(9.0, 0.45 * len(layers) + 7), 3.6))
    _draw_layer_lines(fig.add_subplot(1, 2, 1), layers, mean_shift, title, "||f(x_adv) - f(x)|| / ||f(x)||")
    hx = fig.add_subplot(1, 2, 2)
    for name, values in last_layer_samples.items():
        hx.hist(np.asarray(values, dtype=float), bins=30, alpha=0.5, label=name)
    hx.set_xlabel(f"relative shift at {layers[-1] if layers else 'last layer'}")
    hx.set_ylabel("examples")
    hx.grid(True, alpha=0.3)
    if last_layer_samples:
        hx.legend(fontsize="small")
    return _save(fig, path)


def plot_module_bars(
    path: Path,
    modules: Sequence[str],
    values: Mapping[str, Sequence[float]],
    title: str,
    ylabel: str,
) -> Path:
    """Grouped bars: one group per module, one bar per entry of `values` (symlog axis: traces span
    orders of magnitude across modules and a Hutchinson estimate may be slightly negative)."""
    fig = Figure(figsize=(max(5.0, 0.6 * len(modules) * max(1, len(values)) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(values))
    for i, (name, vals) in enumerate(values.items()):
        ax.bar(np.arange(len(modules)) + (i - (len(values) - 1) / 2) * width, list(vals), width, label=name)
    ax.set_xticks(range(len(modules)))
    ax.set_xticklabels(modules, rotation=45 if len(modules) > 6 else 0)
    finite = [abs(v) for vals in values.values() for v in vals if np.isfinite(v) and v != 0]
    if finite:
        ax.set_yscale("symlog", linthresh=min(finite))
    ax.set_ylabel(ylabel)
    ax.set_xlabel("module")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    if values:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_instance_tracking(
    path: Path,
    epochs: Sequence[int],
    stats: Mapping[str, Sequence[float]],
    robust_correct: np.ndarray,
) -> Path:
    """Instance-wise robustness over training (docs/methods/iseat.md#analysis): AV statistics, robust
    transitions and a map
    of per-example robust correctness (rows sorted by the epoch an example last became robust)."""
    fig = Figure(figsize=(14, 3.8))
    ep = list(epochs)
    ax = fig.add_subplot(1, 3, 1)
    for key, label in (("av_sd", "AV SD"), ("av_top10", "top 10% AV"), ("av_bottom10", "bottom 10% AV")):
        if key in stats:
            ax.plot(ep, list(stats[key]), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("adversarial vulnerability")
    ax.set_title("AV = CE(x_adv) - CE(x)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    bx = fig.add_subplot(1, 3, 2)
    for key, label in (
        ("robust_acc", "robust acc"),
        ("av_high_pct", "AV >= 1"),
        ("av_low_pct", "AV <= 0"),
        ("robust_lost_pct", "robust -> not"),
        ("margin_never_pct", "never flips (mu_max)"),
    ):
        if key in stats:
            bx.plot(ep, list(stats[key]), marker="o", label=label)
    bx.set_xlabel("epoch")
    bx.set_ylabel("% of tracked examples")
    bx.set_title("robust shortcut / disordered robustness")
    bx.grid(True, alpha=0.3)
    bx.legend(fontsize="small")
    cx = fig.add_subplot(1, 3, 3)
    grid = np.asarray(robust_correct, dtype=float)  # (epochs, examples)
    if grid.size:
        # Sort examples by how many tracked epochs they were robust for: stable ones at the top.
        order = np.argsort(-grid.sum(axis=0), kind="stable")
        cx.imshow(grid[:, order].T, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1,
                  extent=(ep[0] - 0.5, ep[-1] + 0.5, grid.shape[1], 0))  # fmt: skip
    cx.set_xlabel("epoch")
    cx.set_ylabel("example (sorted)")
    cx.set_title("robust correctness per example (black = robust)")
    return _save(fig, path)
