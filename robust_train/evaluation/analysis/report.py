"""Reporting of the analysis results: W&B tables and summary scalars, console tables, plot images."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robust_train.tracking.results import pipe_table


def analysis_rows(analysis: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """W&B tables (columns, rows) of each analysis present."""
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
    if "clustering" in analysis:
        c = analysis["clustering"]
        tables["clustering"] = (
            ["input", "layer", "clu_acc"],
            [
                [i, layer, acc[layer]]
                for i, acc in c["accuracy"].items()
                for layer in [*c["layers"], "classifier"]
            ],
        )
    if "hessian_trace" in analysis:
        tables["hessian_trace"] = (
            ["input", "module", "trace", "avg_trace", "n_params", "std_err"],
            [
                [i, m, v["trace"], v["avg_trace"], v["n_params"], v["std_err"]]
                for i, entry in analysis["hessian_trace"]["inputs"].items()
                for m, v in entry["modules"].items()
            ],
        )
    if "layer_shift" in analysis:
        tables["layer_shift"] = (
            ["attack", "layer", "rel_shift_mean", "rel_shift_median", "cosine_mean"],
            [
                [a, layer, v["rel_shift_mean"], v["rel_shift_median"], v["cosine_mean"]]
                for a, per_layer in analysis["layer_shift"]["attacks"].items()
                for layer, v in per_layer.items()
            ],
        )
    return tables


def analysis_summary(analysis: Mapping[str, Any], prefix: str = "analysis") -> dict[str, float]:
    """Flat scalars for the W&B run summary, e.g. analysis/clustering/pgd20/layer4."""
    out: dict[str, float] = {}
    for i, acc in (analysis.get("clustering") or {}).get("accuracy", {}).items():
        out.update({f"{prefix}/clustering/{i}/{k}": v for k, v in acc.items()})
    for i, entry in (analysis.get("hessian_trace") or {}).get("inputs", {}).items():
        out.update(
            {f"{prefix}/hessian_avg_trace/{i}/{m}": v["avg_trace"] for m, v in entry["modules"].items()}
        )
    for a, per_layer in (analysis.get("layer_shift") or {}).get("attacks", {}).items():
        out.update({f"{prefix}/layer_shift/{a}/{k}": v["rel_shift_mean"] for k, v in per_layer.items()})
    return out


def format_analysis(analysis: Mapping[str, Any]) -> str:
    """Console tables of the analysis results (layers as columns)."""
    lines: list[str] = []

    def table(title: str, cols: list[str], rows: list[list[str]]) -> None:
        lines.append(title)
        lines.extend(pipe_table(cols, rows))

    c = analysis.get("clustering")
    if c and c["accuracy"]:
        cols = [*c["layers"], "classifier"]
        table(
            f"clustering-effect accuracy (%), {analysis.get('n_examples')} test images, "
            f"L{c['norm']} nearest centroid of {c['centroids']} training images",
            ["input", *cols],
            [[i, *(f"{acc[k]:.2f}" for k in cols)] for i, acc in c["accuracy"].items()],
        )
    h = analysis.get("hessian_trace")
    if h and h["inputs"]:
        mods = list(next(iter(h["inputs"].values()))["modules"])
        table(
            f"average Hessian trace Tr(H_m)/#params ({h['samples']} Rademacher draws x "
            f"{h['batches']} batches)",
            ["input", *mods],
            [[i, *(f"{e['modules'][m]['avg_trace']:.3e}" for m in mods)] for i, e in h["inputs"].items()],
        )
    s = analysis.get("layer_shift")
    if s and s["attacks"]:
        table(
            "relative feature shift ||f(x_adv) - f(x)|| / ||f(x)|| (mean over examples)",
            ["attack", *s["layers"]],
            [[a, *(f"{v[k]['rel_shift_mean']:.3f}" for k in s["layers"])] for a, v in s["attacks"].items()],
        )
    if analysis.get("skipped"):
        lines.append(f"analysis inputs not in the suite (skipped): {', '.join(analysis['skipped'])}")
    if analysis.get("plots"):
        lines.append("plots: " + ", ".join(str(p) for p in analysis["plots"].values()))
    return "\n".join(lines)


def log_analysis(tracker: Any, analysis: Mapping[str, Any]) -> None:
    """Tables, summary scalars and plot images through the run's tracker."""
    for name, (cols, rows) in analysis_rows(analysis).items():
        tracker.log_table(f"analysis/{name}", cols, rows)
    tracker.summary(analysis_summary(analysis))
    images = {f"analysis/{k}": Path(v) for k, v in (analysis.get("plots") or {}).items()}
    if images and hasattr(tracker, "log_images"):
        tracker.log_images(images)
