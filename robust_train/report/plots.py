"""PNG plots of a report: robust accuracy per attack per method, accuracy vs epoch, robust accuracy vs eps."""

from __future__ import annotations

from pathlib import Path

from robust_train.report.aggregate import Group, eps_points
from robust_train.report.runs import RunRecord


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def plot_attacks(groups: list[Group], path: Path, kind: str = "best") -> Path | None:
    """Grouped bars: accuracy per attack (x) for each method, mean with std error bars."""
    attacks: list[str] = []
    for g in groups:
        attacks += [a for a in (g.stats.get(kind) or {}).get("attacks", {}) if a not in attacks]
    if not attacks:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(attacks) * max(1, len(groups)) ** 0.5 + 2), 3.8))
    width = 0.8 / len(groups)
    for i, g in enumerate(groups):
        stats = (g.stats.get(kind) or {}).get("attacks", {})
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(attacks))]
        means = [stats[a].mean if a in stats else 0.0 for a in attacks]
        errs = [stats[a].std or 0.0 if a in stats else 0.0 for a in attacks]
        ax.bar(xs, means, width, yerr=errs, capsize=3, label=g.label)
    ax.set_xticks(range(len(attacks)), attacks)
    ax.set_ylabel(f"accuracy (%), {kind} checkpoint")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_epochs(groups: list[Group], path: Path) -> Path | None:
    """Validation clean and robust accuracy vs epoch, mean over seeds, one line per method."""
    series = []
    for g in groups:
        per_epoch: dict[int, dict[str, list[float]]] = {}
        for r in g.runs:
            for rec in r.history:
                if rec.get("epoch") is None:
                    continue
                slot = per_epoch.setdefault(int(rec["epoch"]), {"clean": [], "robust": []})
                for key, name in (("val/clean_acc", "clean"), ("val/robust_acc", "robust")):
                    if rec.get(key) is not None:
                        slot[name].append(float(rec[key]))
        if per_epoch:
            series.append((g.label, sorted(per_epoch.items())))
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for label, points in series:
        for ax, name in zip(axes, ("clean", "robust")):
            pts = [(e, sum(v[name]) / len(v[name])) for e, v in points if v[name]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    for ax, name in zip(axes, ("clean", "robust (PGD)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {name} accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_eps(runs: list[RunRecord], path: Path) -> Path | None:
    """Robust accuracy vs eps per method and attack; only when some method has points at several eps."""
    points = eps_points(runs)
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for (label, attack), pts in sorted(points.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label}: {attack}")
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy (%), best checkpoint")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
