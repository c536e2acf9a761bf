"""Runs grouped by their config minus the seed; mean +- std per checkpoint and attack; paper deltas."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from robust_train.report.runs import RunRecord, parse_eps

# Keys that never make two runs different methods: bookkeeping, paths, logging, the presets' paper block.
_IGNORED = (
    "seed",
    "name",
    "device",
    "paper",
    "logger",
    "trainer.progress",
    "dataset.root",
    "dataset.download",
)
# Config groups whose choice is a name: a varying key under such a group is explained by the name.
_NAMED_GROUPS = ("dataset", "model", "defense", "eval", "trainer")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values; lists are leaves (JSON strings, so they hash)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    value = json.dumps(node, sort_keys=True) if isinstance(node, list) else node
    return {prefix[:-1]: value}


def _ignored(key: str, extra: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in _IGNORED + extra)


def addon_names(config: dict[str, Any]) -> list[str]:
    node = config.get("addons") or {}
    return [n for n, c in node.items() if isinstance(c, dict) and c.get("enabled", True)]


def method_name(config: dict[str, Any]) -> str:
    """defense (+ _awp) and add-ons, as in run names: trades_awp+slim."""
    defense = config.get("defense") or {}
    awp = defense.get("awp") or {}
    name = str(defense.get("name", "?")) + ("_awp" if awp.get("enabled") else "")
    return name + "".join(f"+{a}" for a in addon_names(config))


@dataclass
class Stat:
    mean: float
    std: float | None  # sample std over seeds; None with one seed
    n: int

    def fmt(self, digits: int = 2) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def stat(values: list[float]) -> Stat:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Stat(mean, std, n)


@dataclass
class Group:
    """Runs that differ only in the seed (and ignored keys)."""

    label: str
    runs: list[RunRecord]
    # checkpoint kind -> {"epoch": Stat | None, "attacks": {attack: Stat}}
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def seeds(self) -> list[Any]:
        return sorted({r.seed for r in self.runs}, key=str)

    @property
    def paper(self) -> dict[str, Any] | None:
        return next((r.paper for r in self.runs if r.paper), None)

    @property
    def attacks(self) -> list[str]:
        names: list[str] = []
        for entry in self.stats.values():
            names += [a for a in entry["attacks"] if a not in names]
        return names


def _base_label(run: RunRecord, varying_groups: set[str]) -> str:
    config = run.config
    parts = [str((config.get(g) or {}).get("name")) for g in ("dataset", "model") if g in varying_groups]
    # A model robust-train did not train (robustbench:<name>, state_dict:<name>) has no method to name.
    return " ".join(parts + [run.identity or method_name(config)])


def group_runs(runs: list[RunRecord], exclude: tuple[str, ...] = ()) -> list[Group]:
    """Group finished runs by config minus seed (and `exclude` keys); label each group readably."""
    runs = [r for r in runs if r.checkpoints]
    # The identity of a model robust-train did not train is part of what tells runs apart.
    flats = [flatten(r.config) | ({"model_identity": r.identity} if r.identity else {}) for r in runs]
    keys = sorted({k for f in flats for k in f})
    varying = [
        k
        for k in keys
        if not _ignored(k, exclude) and len({json.dumps(f.get(k), default=str) for f in flats}) > 1
    ]
    varying_groups = {g for g in _NAMED_GROUPS if f"{g}.name" in varying}
    if len({tuple(addon_names(r.config)) for r in runs}) > 1:
        varying_groups.add("addons")
    buckets: dict[tuple, list[int]] = {}
    for i, f in enumerate(flats):
        buckets.setdefault(tuple(json.dumps(f.get(k), default=str) for k in varying), []).append(i)
    groups = [
        Group(_base_label(runs[idx[0]], varying_groups), [runs[i] for i in idx]) for idx in buckets.values()
    ]
    # Groups the base label cannot tell apart get the keys that differ among them (defense.beta=3.0).
    by_label: dict[str, list[Group]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        reps = [flatten(g.runs[0].config) for g in same]
        diff = [k for k in varying if len({json.dumps(r.get(k), default=str) for r in reps}) > 1]
        for g, rep in zip(same, reps):
            g.label += " " + " ".join(f"{k}={rep.get(k)}" for k in diff)
    for g in groups:
        g.stats = summarize(g.runs)
    return sorted(groups, key=lambda g: g.label)


def summarize(runs: list[RunRecord]) -> dict[str, dict[str, Any]]:
    """Mean +- std over runs (seeds) of each checkpoint kind's epoch and per-attack accuracy."""
    kinds: list[str] = []
    for r in runs:
        kinds += [k for k in r.checkpoints if k not in kinds]
    out: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        entries = [r.checkpoints[kind] for r in runs if kind in r.checkpoints]
        epochs = [float(e["epoch"]) for e in entries if e.get("epoch") is not None]
        attacks: dict[str, list[float]] = {}
        for e in entries:
            for name, a in e["attacks"].items():
                attacks.setdefault(name, []).append(a["accuracy"])
        weights = {e.get("weights") for e in entries}
        out[kind] = {
            "epoch": stat(epochs) if epochs else None,
            # trained | ema when every run evaluated this kind with the same weights, else None
            "weights": weights.pop() if len(weights) == 1 else None,
            "attacks": {name: stat(values) for name, values in attacks.items()},
            "time_s": {
                name: stat(
                    [
                        e["attacks"][name]["time_s"]
                        for e in entries
                        if e["attacks"].get(name, {}).get("time_s") is not None
                    ]
                )
                for name in attacks
                if any(e["attacks"].get(name, {}).get("time_s") is not None for e in entries)
            },
        }
    return out


# ----------------------------------------------------------------------------- the papers

_NOT_METRICS = ("epoch",)


@dataclass
class PaperRow:
    label: str  # our group
    source: str  # the paper's method name / source
    row: str  # the row of the paper block (table4, best, first_second, ...)
    checkpoint: str  # our checkpoint compared (best, or the row's own kind)
    attack: str
    paper: float | tuple[float, float]
    paper_std: float | None
    ours: Stat

    @property
    def diff(self) -> float:
        """Ours minus the paper; for a range, the distance outside it (0 inside)."""
        if isinstance(self.paper, tuple):
            lo, hi = self.paper
            return (
                0.0 if lo <= self.ours.mean <= hi else (self.ours.mean - (hi if self.ours.mean > hi else lo))
            )
        return self.ours.mean - self.paper

    def paper_text(self) -> str:
        if isinstance(self.paper, tuple):
            return f"{self.paper[0]:.2f}–{self.paper[1]:.2f}"
        return f"{self.paper:.2f}" + (f" ± {self.paper_std:.2f}" if self.paper_std is not None else "")


def paper_rows(group: Group) -> tuple[list[PaperRow], list[str]]:
    """Our numbers beside each row of the preset's paper block, for the attacks we ran; and the notes
    on paper columns we have no attack for."""
    paper = group.paper
    if not paper:
        return [], []
    source = str(paper.get("method") or paper.get("source") or "paper")
    rows: list[PaperRow] = []
    missing: list[str] = []
    for row, metrics in (paper.get("results") or {}).items():
        if not isinstance(metrics, dict):
            continue
        kind = (
            row
            if row in group.stats
            else ("best" if "best" in group.stats else next(iter(group.stats), None))
        )
        if kind is None:
            continue
        ours_attacks = group.stats[kind]["attacks"]
        for metric, value in metrics.items():
            if metric in _NOT_METRICS or metric.endswith("_std"):
                continue
            if isinstance(value, list | tuple) and len(value) == 2:
                ref: float | tuple[float, float] = (float(value[0]), float(value[1]))
            elif isinstance(value, int | float):
                ref = float(value)
            else:
                continue
            if metric not in ours_attacks:
                missing.append(f"{row}.{metric}")
                continue
            std = metrics.get(f"{metric}_std")
            rows.append(
                PaperRow(group.label, source, row, kind, metric, ref, float(std) if std is not None else None,
                         ours_attacks[metric])
            )  # fmt: skip
    return rows, missing


def eps_points(runs: list[RunRecord], kind: str = "best") -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(method without eps, attack) -> [(eps, mean robust accuracy)], when eps differs across points.

    Points come from runs that differ in threat.eps and from attacks of one run with their own eps
    (fgsm8 / fgsm12): an attack with its own eps is keyed by its kind (its name without the digits)."""
    groups = group_runs(runs, exclude=("threat.eps", "dataset.threat.eps"))
    out: dict[tuple[str, str], dict[float, list[float]]] = {}
    for g in groups:
        for r in g.runs:
            entry = r.checkpoints.get(kind) or next(iter(r.checkpoints.values()))
            run_eps = parse_eps((r.config.get("threat") or {}).get("eps"))
            eps_of = {
                name: a.get("eps") if a.get("eps") is not None else run_eps
                for name, a in entry["attacks"].items()
                if name != "clean"
            }
            stems: dict[str, set] = {}
            for name, eps in eps_of.items():
                stems.setdefault(name.rstrip("0123456789") or name, set()).add(eps)
            for name, eps in eps_of.items():
                if eps is None:
                    continue
                stem = name.rstrip("0123456789") or name
                # fgsm8 / fgsm12 of one run are one attack at two eps; pgd20 / pgd100 at one eps are two.
                family = stem if len(stems[stem]) > 1 else name
                a = entry["attacks"][name]
                out.setdefault((g.label, family), {}).setdefault(eps, []).append(a["accuracy"])
    return {
        key: sorted((e, sum(v) / len(v)) for e, v in pts.items()) for key, pts in out.items() if len(pts) > 1
    }
