"""PNG plots of a report: accuracy per attack per checkpoint kind, accuracy vs epoch, clean vs robust
(Pareto), robust accuracy vs eps.

Each plot has a `*_figure` function that returns the matplotlib Figure (the tests read its titles,
legend and ticks) and a `plot_*` function that writes it to a PNG. Every figure's suptitle says what it
shows, then the dataset(s), the threat model, the seeds per group and the checkpoint kind; every legend
entry carries its group's seed count. One group has one color in all plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robust_train.report.aggregate import (
    Group,
    Stat,
    checkpoint_of,
    comparable_groups,
    eps_stats,
    history_stats,
    pareto_front,
    strongest_shared_attack,
)
from robust_train.report.runs import RunRecord, format_eps, run_eps
from robust_train.tracking.results import checkpoint_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ATTACKS_PNG = "robust_by_attack.png"
EPOCHS_PNG = "accuracy_vs_epoch.png"
PARETO_PNG = "clean_vs_robust.png"
EPS_PNG = "robust_vs_eps.png"
# What each PNG shows, for report.md's image text and report.html's captions.
CAPTIONS = {
    ATTACKS_PNG: "Accuracy per attack, one panel per checkpoint kind (mean ± std over seeds)",
    EPOCHS_PNG: "Validation clean and robust accuracy during training (mean ± std over seeds)",
    PARETO_PNG: "Clean vs robust accuracy per group; the Pareto front is connected",
    EPS_PNG: "Robust accuracy vs the attack's eps (best checkpoint)",
}
# Checkpoint kinds in the order panels show them; other kinds (robustbench, state_dict) follow.
KIND_ORDER = ("best", "last", "ema")
_NORMS = {"linf": "L∞", "l2": "L2", "l1": "L1"}
DPI = 120


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; works without a display
    import matplotlib.pyplot as plt

    return plt


def legend_label(group: Group, n: int | None = None) -> str:
    """The group's label with how many seeds its numbers average: `trades (n=3)`."""
    return f"{group.label} (n={group.n if n is None else n})"


def group_colors(groups: Sequence[Group]) -> dict[str, Any]:
    """A color per group label, by the group's place in the (sorted) list, so plots agree."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(groups) <= 10 else "tab20"]
    return {g.label: cmap(i % cmap.N) for i, g in enumerate(groups)}


def describe_threat(runs: Sequence[RunRecord]) -> str:
    """`L∞ eps=8/255`; several radii read `eps=2/255, 4/255, 8/255`."""
    norms = sorted({str((r.config.get("threat") or {}).get("norm")) for r in runs} - {"None"})
    radii = sorted({e for e in (run_eps(r.config) for r in runs) if e is not None})
    norm = "/".join(_NORMS.get(n, n) for n in norms)
    if not radii:
        return norm
    shown = [format_eps(e) for e in radii]
    if len(shown) > 4:
        shown = [shown[0], "…", shown[-1]]
    return f"{norm} eps={', '.join(shown)}".strip()


def seed_counts(ns: Sequence[int]) -> str:
    """`n=3 seeds per group`, or `n=2–3 seeds per group` when the groups have different counts."""
    lo, hi = min(ns), max(ns)
    seeds = "seed" if hi == 1 else "seeds"
    return f"n={lo} {seeds} per group" if lo == hi else f"n={lo}–{hi} {seeds} per group"


def plot_context(groups: Sequence[Group], checkpoint: str | None, ns: Sequence[int] | None = None) -> str:
    """The second title line: datasets · threat model · seeds per group · checkpoint."""
    runs = [r for g in groups for r in g.runs]
    datasets = sorted({str((r.config.get("dataset") or {}).get("name")) for r in runs} - {"None"})
    parts = [", ".join(datasets), describe_threat(runs), seed_counts(ns or [g.n for g in groups])]
    if checkpoint:
        parts.append(checkpoint)
    return " · ".join(p for p in parts if p)


def _kinds(groups: Sequence[Group]) -> list[str]:
    found: list[str] = []
    for g in groups:
        found += [k for k in g.stats if k not in found]
    return [k for k in KIND_ORDER if k in found] + [k for k in found if k not in KIND_ORDER]


def _kind_title(kind: str, groups: Sequence[Group]) -> str:
    """`best checkpoint`, or `best (ema) checkpoint` when every group evaluated best.pt with EMA weights."""
    weights = {(g.stats.get(kind) or {}).get("weights") for g in groups if kind in g.stats}
    label = checkpoint_label(kind, {"weights": weights.pop()}) if len(weights) == 1 else kind
    return f"{label} checkpoint"


def _title(fig: Figure, what: str, context: str) -> None:
    fig.suptitle(f"{what}\n{context}", fontsize=10.5)


def _legend(fig: Figure, handles: list[Any], labels: list[str], width_in: float) -> None:
    """One legend for the figure, below the axes, in as many columns as the labels' length allows."""
    longest = max(len(text) for text in labels)
    # About 5 points per character at font size 8, plus the handle and the gap.
    per_entry = longest * 5.0 + 35
    fits = max(1, min(len(labels), int(width_in * 72 // per_entry)))
    rows = -(-len(labels) // fits)
    ncol = -(-len(labels) // rows)  # rows filled evenly: 3 + 2, not 4 + 1
    fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)


def _save(fig: Figure, path: Path) -> Path:
    plt = _pyplot()
    # bbox_inches="tight": nothing that sticks out of the canvas (a long tick label) is cut off.
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- accuracy per attack


def _attack_eps(groups: Sequence[Group], kind: str, attack: str) -> str | None:
    """The attack's own eps when it differs from the runs' threat model (fgsm12 at 12/255), else None."""
    own, threat = set(), set()
    for g in groups:
        for r in g.runs:
            a = ((r.checkpoints.get(kind) or {}).get("attacks") or {}).get(attack) or {}
            if a.get("eps") is not None:
                own.add(a["eps"])
                threat.add(run_eps(r.config))
    if len(own) == 1 and own != threat:
        return format_eps(own.pop())
    return None


def attacks_figure(groups: list[Group]) -> Figure | None:
    """Grouped bars of accuracy per attack (mean, std error bars), one panel per checkpoint kind
    (best | last | ema), the panels side by side on one y axis."""
    panels = []
    for kind in _kinds(groups):
        members = [g for g in groups if kind in g.stats]
        attacks: list[str] = []
        for g in members:
            attacks += [a for a in g.stats[kind]["attacks"] if a not in attacks]
        if attacks:
            panels.append((kind, members, attacks))
    if not panels:
        return None
    plt = _pyplot()
    colors = group_colors(groups)
    # Panels as wide as their bars need, so that bars have one width in every panel.
    bars_in = [sum(len([g for g in m if a in g.stats[k]["attacks"]]) for a in at) for k, m, at in panels]
    widths = [max(2.4, 0.12 * n + 0.28 * len(a)) for n, (_, _, a) in zip(bars_in, panels)]
    width_in = max(6.0, sum(widths) + 1.0)
    fig, axes = plt.subplots(
        1, len(panels), sharey=True, squeeze=False, figsize=(width_in, 4.6), layout="constrained",
        width_ratios=widths, dpi=DPI,
    )  # fmt: skip
    handles: dict[str, Any] = {}
    for ax, (kind, members, attacks), n_bars, panel_in in zip(axes[0], panels, bars_in, widths):
        # Each attack's cluster holds the groups that ran it, centered: suites of different sizes leave
        # no holes.
        ran = {a: [g for g in members if a in g.stats[kind]["attacks"]] for a in attacks}
        width = 0.8 / max(len(gs) for gs in ran.values())
        for j, a in enumerate(attacks):
            for i, g in enumerate(ran[a]):
                s = g.stats[kind]["attacks"][a]
                x = j + (i - (len(ran[a]) - 1) / 2) * width
                err = s.std or 0.0
                bars = ax.bar([x], [s.mean], width * 0.9, yerr=[err], capsize=2, color=colors[g.label],
                              error_kw={"elinewidth": 0.8, "ecolor": "0.25"})  # fmt: skip
                handles.setdefault(legend_label(g), bars)
                if n_bars <= 32:
                    ax.text(x, s.mean + err + 2, f"{s.mean:.1f}", ha="center", va="bottom", fontsize=6,
                            rotation=90 if width < 0.3 else 0)  # fmt: skip
        ticks = []
        for a in attacks:
            own = _attack_eps(members, kind, a)
            ticks.append(a if own is None else f"{a}\n(eps {own})")
        # Slanted when a name is wider than its cluster (about 0.075 in per character at size 9).
        longest = max(len(line) for t in ticks for line in t.split("\n"))
        rotate = longest * 0.075 > 0.9 * panel_in / len(attacks)
        ax.set_xticks(range(len(attacks)), ticks, fontsize=9, rotation=30 if rotate else 0,
                      ha="right" if rotate else "center", rotation_mode="anchor")  # fmt: skip
        ax.set_xlim(-0.6, len(attacks) - 0.4)
        ax.set_title(_kind_title(kind, members), fontsize=9.5)
        ax.set_ylim(0, 112)  # room for the value labels above 100 % bars
        ax.set_yticks(range(0, 101, 20))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    kinds = " | ".join(k for k, _, _ in panels)
    _title(
        fig, f"Accuracy per attack, checkpoints {kinds} (mean ± std over seeds)", plot_context(groups, None)
    )
    labels = [legend_label(g) for g in groups if legend_label(g) in handles]  # the groups' order
    _legend(fig, [handles[t] for t in labels], labels, width_in)
    return fig


def plot_attacks(groups: list[Group], path: Path) -> Path | None:
    fig = attacks_figure(groups)
    return None if fig is None else _save(fig, path)


# ----------------------------------------------------------------------------- accuracy vs epoch


def _validation_attack(groups: Sequence[Group]) -> str:
    steps = {
        ((r.config.get("trainer") or {}).get("validation") or {}).get("pgd_steps")
        for g in groups
        for r in g.runs
    }
    return f"PGD-{steps.pop()}" if len(steps) == 1 and None not in steps else "PGD"


def epochs_figure(groups: list[Group]) -> Figure | None:
    """Validation clean | robust accuracy vs epoch: the mean over seeds as a line, mean ± std as a band
    (groups of several seeds), a star at the epoch of the best checkpoint (mean over seeds)."""
    series = [(g, history_stats(g)) for g in groups]
    series = [(g, h) for g, h in series if h["clean"] or h["robust"]]
    if not series:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    colors = group_colors(groups)
    width_in = 10.0
    fig, axes = plt.subplots(1, 2, sharex=True, figsize=(width_in, 4.4), layout="constrained", dpi=DPI)
    attack = _validation_attack(groups)
    handles: dict[str, Any] = {}
    marked_best = False
    for g, hist in series:
        n_hist = sum(1 for r in g.runs if r.history)
        color = colors[g.label]
        best = (g.stats.get("best") or {}).get("epoch")
        for ax, name in zip(axes, ("clean", "robust")):
            pts = hist[name]
            if not pts:
                continue
            xs = [e for e, _ in pts]
            means = [s.mean for _, s in pts]
            (line,) = ax.plot(xs, means, color=color, marker="o", ms=2.5, lw=1.4)
            handles.setdefault(legend_label(g, n_hist), line)
            if n_hist > 1:
                stds = [s.std or 0.0 for _, s in pts]
                # Accuracy lives in [0, 100]; a band past it would suggest values no seed can have.
                low = [max(0.0, m - s) for m, s in zip(means, stds)]
                high = [min(100.0, m + s) for m, s in zip(means, stds)]
                # Many groups' bands overlap: fainter ones keep the lines readable.
                ax.fill_between(xs, low, high, color=color, alpha=0.18 if len(series) <= 5 else 0.1, lw=0)
            if isinstance(best, Stat):
                # The best epoch's mean over seeds need not be an epoch: mark the nearest one on the line.
                j = min(range(len(xs)), key=lambda k: abs(xs[k] - best.mean))
                ax.plot([xs[j]], [means[j]], marker="*", ms=11, color=color, mec="black", mew=0.6, zorder=5)
                marked_best = True
    for ax, name in zip(axes, ("clean", f"robust ({attack})")):
        ax.set_title(f"{name} accuracy on the validation split", fontsize=9.5)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} accuracy (%)")
        # Epochs are whole numbers: no 1.5 ticks on short runs.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    labels = list(handles)
    lines = list(handles.values())
    if marked_best:
        labels.append("best checkpoint (mean epoch)")
        lines.append(Line2D([], [], ls="", marker="*", ms=11, color="0.6", mec="black", mew=0.6))
    ns = [sum(1 for r in g.runs if r.history) for g, _ in series]
    banded = any(n > 1 for n in ns)
    _title(
        fig,
        "Validation accuracy during training" + (" (line: mean over seeds, band: ± std)" if banded else ""),
        plot_context([g for g, _ in series], "every epoch's model", ns),
    )
    _legend(fig, lines, labels, width_in)
    return fig


def plot_epochs(groups: list[Group], path: Path) -> Path | None:
    fig = epochs_figure(groups)
    return None if fig is None else _save(fig, path)


# ----------------------------------------------------------------------------- clean vs robust


def _place_labels(
    fig: Figure, ax: Axes, items: list[tuple[float, float, str, Any]], obstacles: list[tuple[float, float]]
) -> None:
    """Annotate points with text that covers no other label, point, error bar or line (data points in
    `obstacles`), where it can: each label tries positions around its point and keeps the freest one
    inside the axes."""
    fig.canvas.draw()  # layout and a renderer, so that text sizes are known
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    box = ax.get_window_extent(renderer)
    pixels = [tuple(ax.transData.transform(p)) for p in obstacles]
    taken: list[Any] = []
    candidates = [(7, 5, "left", "bottom"), (7, -5, "left", "top"), (-7, 5, "right", "bottom"),
                  (-7, -5, "right", "top"), (0, 10, "center", "bottom"), (0, -10, "center", "top"),
                  (14, 18, "left", "bottom"), (-14, -18, "right", "top"), (14, -18, "left", "top"),
                  (-14, 18, "right", "bottom")]  # fmt: skip
    for x, y, text, color in items:
        best = None
        for dx, dy, ha, va in candidates:
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                              fontsize=7.5, color=color)  # fmt: skip
            ann.set_in_layout(False)
            ext = ann.get_window_extent(renderer)
            inside = (
                box.x0 + 3 <= ext.x0
                and ext.x1 <= box.x1 - 3
                and box.y0 + 3 <= ext.y0
                and ext.y1 <= box.y1 - 3
            )
            covered = sum(
                ext.x0 - 2 <= px <= ext.x1 + 2 and ext.y0 - 2 <= py <= ext.y1 + 2 for px, py in pixels
            )
            score = covered + 5 * sum(ext.overlaps(t) for t in taken) + (0 if inside else 100)
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, ann, ext)
            else:
                ann.remove()
            if score == 0:
                break
        assert best is not None
        taken.append(best[2])


def _along(a: tuple[float, float], b: tuple[float, float], n: int = 12) -> list[tuple[float, float]]:
    return [(a[0] + (b[0] - a[0]) * k / n, a[1] + (b[1] - a[1]) * k / n) for k in range(n + 1)]


def pareto_figure(groups: list[Group], preferred: str = "best") -> Figure | None:
    """Clean (x) vs robust (y) accuracy per group: the strongest attack all groups ran, std error bars in
    both directions; points on the Pareto front filled and connected, dominated ones hollow."""
    members = [g for g in comparable_groups(groups) if checkpoint_of(g, preferred)]
    members = [g for g in members if "clean" in g.stats[checkpoint_of(g, preferred) or ""]["attacks"]]
    attack = strongest_shared_attack(members, preferred)
    if attack is None or len(members) < 2:
        return None
    plt = _pyplot()
    from matplotlib.lines import Line2D

    colors = group_colors(groups)
    stats = [g.stats[checkpoint_of(g, preferred) or ""]["attacks"] for g in members]
    points = [(s["clean"].mean, s[attack].mean) for s in stats]
    front = set(pareto_front(points))
    width_in = 7.5
    fig, ax = plt.subplots(figsize=(width_in, 5.4), layout="constrained", dpi=DPI)
    ordered = sorted(front, key=lambda i: points[i][0])
    ax.plot([points[i][0] for i in ordered], [points[i][1] for i in ordered], ls="--", lw=1.2, color="0.45",
            zorder=1)  # fmt: skip
    for i, (g, s) in enumerate(zip(members, stats)):
        on = i in front
        ax.errorbar(*points[i], xerr=s["clean"].std or 0.0, yerr=s[attack].std or 0.0, fmt="o", ms=7,
                    color=colors[g.label], mfc=colors[g.label] if on else "white", mew=1.5, capsize=3,
                    elinewidth=0.9, zorder=3)  # fmt: skip
    ax.margins(0.25)
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"robust accuracy (%) under {attack}\n(the strongest attack all groups ran)")
    ax.grid(alpha=0.3)
    kinds = sorted({checkpoint_of(g, preferred) or "" for g in members})
    left_out = len(groups) - len(members)
    others = f"\n({left_out} more group(s), on other data or under another threat model, not shown)"
    _title(
        fig,
        f"Clean vs robust accuracy ({attack}), mean ± std over seeds" + (others if left_out else ""),
        plot_context(members, " / ".join(f"{k} checkpoint" for k in kinds)),
    )
    key = [
        Line2D(
            [], [], ls="--", color="0.45", marker="o", mfc="0.45", mec="0.45", label="on the Pareto front"
        ),
        Line2D([], [], ls="", marker="o", mfc="white", mec="0.45", mew=1.5, label="dominated"),
    ]
    ax.legend(handles=key, fontsize=8, loc="best")
    # What a label must not cover: the points, their error bars and the front's line.
    obstacles: list[tuple[float, float]] = []
    for (x, y), s in zip(points, stats):
        dx, dy = s["clean"].std or 0.0, s[attack].std or 0.0
        obstacles += _along((x - dx, y), (x + dx, y)) + _along((x, y - dy), (x, y + dy))
    for a, b in zip(ordered, ordered[1:]):
        obstacles += _along(points[a], points[b], 40)
    _place_labels(
        fig, ax, [(*points[i], legend_label(g), colors[g.label]) for i, g in enumerate(members)], obstacles
    )
    return fig


def plot_pareto(groups: list[Group], path: Path) -> Path | None:
    fig = pareto_figure(groups)
    return None if fig is None else _save(fig, path)


# ----------------------------------------------------------------------------- robust accuracy vs eps


def eps_figure(runs: list[RunRecord], kind: str = "best") -> Figure | None:
    """Robust accuracy vs eps per method and attack (mean, ± std band over seeds); only when some method
    has points at several eps."""
    points = eps_stats(runs, kind)
    if not points:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, FuncFormatter

    cmap = plt.get_cmap("tab10" if len(points) <= 10 else "tab20")
    width_in = 7.0
    fig, ax = plt.subplots(figsize=(width_in, 4.6), layout="constrained", dpi=DPI)
    radii: set[float] = set()
    ns: list[int] = []
    for c, ((label, attack), pts) in enumerate(sorted(points.items())):
        xs = [e for e, _ in pts]
        means = [s.mean for _, s in pts]
        n = max(s.n for _, s in pts)
        ns.append(n)
        radii.update(xs)
        ax.plot(xs, means, marker="o", ms=4, color=cmap(c % cmap.N), label=f"{label}: {attack} (n={n})")
        if n > 1:
            stds = [s.std or 0.0 for _, s in pts]
            ax.fill_between(xs, [max(0.0, m - s) for m, s in zip(means, stds)],
                            [min(100.0, m + s) for m, s in zip(means, stds)],
                            color=cmap(c % cmap.N), alpha=0.18, lw=0)  # fmt: skip
    # Ticks at the radii that were run, written as 8/255 where they are 255ths.
    ax.xaxis.set_major_locator(FixedLocator(sorted(radii)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_eps(v)))
    if len(radii) > 5:
        ax.tick_params(axis="x", labelrotation=45)
    ax.set_xlabel("eps of the attack")
    ax.set_ylabel("robust accuracy (%)")
    ax.grid(alpha=0.3)
    evaluated = [r for r in runs if r.checkpoints]
    norms = sorted({str((r.config.get("threat") or {}).get("norm")) for r in evaluated} - {"None"})
    datasets = sorted({str((r.config.get("dataset") or {}).get("name")) for r in evaluated} - {"None"})
    eps_range = f"eps={format_eps(min(radii))}–{format_eps(max(radii))}"
    context = " · ".join(
        [", ".join(datasets), f"{'/'.join(_NORMS.get(n, n) for n in norms)} {eps_range}".strip(),
         seed_counts(ns), f"{kind} checkpoint"]
    )  # fmt: skip
    banded = " (line: mean over seeds, band: ± std)" if max(ns) > 1 else ""
    _title(fig, "Robust accuracy vs eps" + banded, context)
    handles, labels = ax.get_legend_handles_labels()
    _legend(fig, handles, labels, width_in)
    return fig


def plot_eps(runs: list[RunRecord], path: Path) -> Path | None:
    fig = eps_figure(runs)
    return None if fig is None else _save(fig, path)
