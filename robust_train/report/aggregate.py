"""Runs grouped by their config minus the seed; mean +- std per checkpoint and attack; paper deltas."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from robust_train.errors import ConfigError
from robust_train.report.runs import RunRecord, format_eps, parse_eps, run_eps
from robust_train.schema import resolve_step

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
    # Run metadata (overrides, run dir, git sha, parameter count): it differs in every run.
    "run",
    # Re-running an evaluation over existing numbers does not change what was evaluated.
    "eval.force",
    # robust-eval's path of the evaluated checkpoint and its link to the training run (W&B config):
    # one per seed, so they would keep the seeds of an evaluation apart.
    "checkpoint",
    "train_run",
)
# Longest group label: legends and table cells stay readable; the full label goes to report.md's notes.
LABEL_MAX = 60
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:e-?\d+)?")
_NUMBER_SPLIT = re.compile(r"(\d+(?:\.\d+)?(?:e-?\d+)?)")
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


def numeric_flat(config: dict[str, Any]) -> dict[str, Any]:
    """flatten(config) with radii and steps as numbers: results.json of older versions keep '8/255' and
    'eps/4' as written, newer ones the numbers; the same budget must group (and read) the same."""
    flat = flatten(config)
    for key, value in flat.items():
        if key.rsplit(".", 1)[-1] == "eps" and isinstance(value, str):
            flat[key] = parse_eps(value) if parse_eps(value) is not None else value
    threat = flat.get("threat.eps")
    for key, value in flat.items():
        if key.rsplit(".", 1)[-1] == "step" and isinstance(value, str):
            eps = flat.get(key[: -len("step")] + "eps")
            eps = eps if isinstance(eps, float) else threat
            if isinstance(eps, float):
                try:
                    flat[key] = resolve_step(value, eps, key)
                except ConfigError:
                    pass
    return flat


class RelativeStep(str):
    """A step size as a multiple of its eps (`eps/4`): what tells runs apart is the ratio, since a sweep
    over eps changes every step that follows it."""


def relative_steps(flat: dict[str, Any]) -> dict[str, Any]:
    """`numeric_flat` with every step that is a simple fraction of its eps written as that fraction."""
    out = dict(flat)
    threat = flat.get("threat.eps")
    for key, value in flat.items():
        if key.rsplit(".", 1)[-1] != "step" or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        eps = flat.get(key[: -len("step")] + "eps")
        eps = eps if isinstance(eps, int | float) and eps else threat
        if not isinstance(eps, int | float) or not eps:
            continue
        ratio = float(value) / float(eps)
        inverse = 1 / ratio if ratio else 0.0
        if ratio and abs(inverse - round(inverse)) < 1e-6:
            out[key] = RelativeStep("eps" if round(inverse) == 1 else f"eps/{round(inverse)}")
        else:
            out[key] = RelativeStep(f"{ratio:.6g}*eps")
    return out


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
    # The label before it was cut to LABEL_MAX characters (or tagged unique); None when it was not.
    full_label: str | None = None

    @property
    def seeds(self) -> list[Any]:
        return sorted({r.seed for r in self.runs}, key=str)

    @property
    def n(self) -> int:
        """How many runs (seeds) the group's numbers average."""
        return len(self.runs)

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


def _same(values: Sequence[Any]) -> bool:
    return len({json.dumps(v, default=str) for v in values}) <= 1


def short_key(key: str, keys: set[str]) -> str:
    """The shortest dotted tail of `key` that no other key in `keys` ends with: trainer.optimizer.lr -> lr,
    but defense.attack.steps stays whole beside trainer.instance_tracking.attack.steps."""
    parts = key.split(".")
    for n in range(1, len(parts)):
        tail = parts[-n:]
        if sum(1 for k in keys if k.split(".")[-n:] == tail) == 1:
            return ".".join(tail)
    return key


def _value_text(key: str, value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, RelativeStep):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if key.rsplit(".", 1)[-1] in ("eps", "step"):
            return format_eps(float(value))
        return f"{value:g}" if isinstance(value, float) else str(value)  # beta=6, not beta=6.0
    return str(value)


def _suite(flat: dict[str, Any]) -> list[str]:
    """The attack columns of a run's evaluation suite (nodes set to null are not in it)."""
    names = {k.split(".")[2] for k, v in flat.items() if k.startswith("eval.attacks.") and v is not None}
    return sorted(names - {""})


def diff_parts(flats: list[dict[str, Any]], keys: list[str], all_keys: set[str]) -> list[list[str]]:
    """Per flattened config, the `key=value` words that tell it from the others, keys shortened.

    An evaluation suite is named, never spelled out: its attacks' settings are tens of keys (hundreds of
    characters). Suites that differ in name read `eval=full`; unnamed suites with other attacks read
    `eval=clean+pgd20`; only settings of the same attacks in suites of one name are listed as keys.
    """
    diff = [k for k in keys if not _same([f.get(k) for f in flats])]
    summary: list[str] | None = None
    if "eval.name" in diff:
        summary = [f"eval={f.get('eval.name')}" for f in flats]
        diff = [k for k in diff if not k.startswith("eval.")]
    elif not _same([_suite(f) for f in flats]):
        summary = ["eval=" + "+".join(_suite(f)) for f in flats]
        diff = [k for k in diff if not k.startswith("eval.attacks.")]
    out = []
    for i, f in enumerate(flats):
        words = [(k, f"{short_key(k, all_keys)}={_value_text(k, f.get(k))}") for k in diff]
        if summary is not None:
            words.append(("eval", summary[i]))
        out.append([w for _, w in sorted(words)])
    return out


def cap_label(label: str, limit: int = LABEL_MAX) -> str:
    """The label cut to `limit` characters with an ellipsis."""
    return label if len(label) <= limit else label[: limit - 1].rstrip() + "…"


def group_runs(runs: list[RunRecord], exclude: tuple[str, ...] = ()) -> list[Group]:
    """Group finished runs by config minus seed (and `exclude` keys); label each group readably."""
    runs = [r for r in runs if r.checkpoints]
    # The identity of a model robust-train did not train is part of what tells runs apart.
    # Steps as fractions of eps: an eps sweep moves every step with it, and only eps should tell apart.
    flats = [
        relative_steps(numeric_flat(r.config)) | ({"model_identity": r.identity} if r.identity else {})
        for r in runs
    ]
    all_keys = {k for f in flats for k in f}
    keys = sorted(all_keys)
    varying = [k for k in keys if not _ignored(k, exclude) and not _same([f.get(k) for f in flats])]
    varying_groups = {g for g in _NAMED_GROUPS if f"{g}.name" in varying}
    if len({tuple(addon_names(r.config)) for r in runs}) > 1:
        varying_groups.add("addons")
    buckets: dict[tuple, list[int]] = {}
    for i, f in enumerate(flats):
        buckets.setdefault(tuple(json.dumps(f.get(k), default=str) for k in varying), []).append(i)
    groups = [
        Group(_base_label(runs[idx[0]], varying_groups), [runs[i] for i in idx]) for idx in buckets.values()
    ]
    if "threat.eps" in varying:
        # Groups at different radii are different numbers, even when their methods differ anyway.
        for g, idx in zip(groups, buckets.values()):
            g.label += f" eps={_value_text('threat.eps', flats[idx[0]].get('threat.eps'))}"
        varying = [k for k in varying if k != "threat.eps"]
    reps = {id(g): flats[idx[0]] for g, idx in zip(groups, buckets.values())}
    # Groups the base label cannot tell apart get the keys that differ among them (beta=3).
    by_label: dict[str, list[Group]] = {}
    for g in groups:
        by_label.setdefault(g.label, []).append(g)
    for same in by_label.values():
        if len(same) < 2:
            continue
        for g, words in zip(same, diff_parts([reps[id(g)] for g in same], varying, all_keys)):
            g.label = " ".join([g.label, *words])
    _cap_labels(groups)
    for g in groups:
        g.stats = summarize(g.runs)
    return sorted(groups, key=lambda g: natural_key(g.label))


def natural_key(text: str) -> list[Any]:
    """Sort key that puts eps=2/255 before eps=16/255 and lr=0.05 before lr=0.1."""
    return [
        (0, float(t), "") if _NUMBER.fullmatch(t) else (1, 0.0, t) for t in _NUMBER_SPLIT.split(text) if t
    ]


def _cap_labels(groups: list[Group]) -> None:
    """Cut long labels; labels that are equal after the cut (or that print equal values of different
    keys) get a short hash of their group's config, so each is unique and the same on every report."""
    count: dict[str, int] = {}
    for g in groups:
        count[cap_label(g.label)] = count.get(cap_label(g.label), 0) + 1
    for g in groups:
        text = cap_label(g.label)
        if count[text] > 1:
            config = json.dumps(numeric_flat(g.runs[0].config), sort_keys=True, default=str)
            tag = "#" + hashlib.sha1(config.encode()).hexdigest()[:4]
            text = cap_label(g.label, LABEL_MAX - len(tag) - 1) + " " + tag
        if text != g.label:
            g.full_label, g.label = g.label, text


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


def history_stats(group: Group) -> dict[str, list[tuple[int, Stat]]]:
    """Validation accuracy per epoch over the group's runs: {"clean": [(epoch, Stat)], "robust": [...]}."""
    per_epoch: dict[str, dict[int, list[float]]] = {"clean": {}, "robust": {}}
    for r in group.runs:
        for rec in r.history:
            if rec.get("epoch") is None:
                continue
            for key, name in (("val/clean_acc", "clean"), ("val/robust_acc", "robust")):
                if rec.get(key) is not None:
                    per_epoch[name].setdefault(int(rec["epoch"]), []).append(float(rec[key]))
    return {name: [(e, stat(v)) for e, v in sorted(pts.items())] for name, pts in per_epoch.items()}


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
    """(method without eps, attack) -> [(eps, mean robust accuracy)], when eps differs across points."""
    return {key: [(e, s.mean) for e, s in pts] for key, pts in eps_stats(runs, kind).items()}


def eps_stats(runs: list[RunRecord], kind: str = "best") -> dict[tuple[str, str], list[tuple[float, Stat]]]:
    """(method without eps, attack) -> [(eps, robust accuracy over seeds)], when eps differs across points.

    Points come from runs that differ in threat.eps and from attacks of one run with their own eps
    (fgsm8 / fgsm12): an attack with its own eps is keyed by its kind (its name without the digits)."""
    groups = group_runs(runs, exclude=("threat.eps", "dataset.threat.eps"))
    out: dict[tuple[str, str], dict[float, list[float]]] = {}
    for g in groups:
        for r in g.runs:
            entry = r.checkpoints.get(kind) or next(iter(r.checkpoints.values()))
            eps_run = run_eps(r.config)
            eps_of = {
                name: a.get("eps") if a.get("eps") is not None else eps_run
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
    return {key: [(e, stat(pts[e])) for e in sorted(pts)] for key, pts in out.items() if len(pts) > 1}


# ----------------------------------------------------------------------------- clean vs robust


def checkpoint_of(group: Group, preferred: str = "best") -> str | None:
    """The kind a one-number-per-group view shows: `preferred` when the group has it, else its first."""
    return preferred if preferred in group.stats else next(iter(group.stats), None)


def threat_of(group: Group) -> tuple[str, str, float | None]:
    """(dataset, norm, eps) of the group's runs (they agree: only the seed differs within a group)."""
    config = group.runs[0].config
    return (
        str((config.get("dataset") or {}).get("name")),
        str((config.get("threat") or {}).get("norm")),
        run_eps(config),
    )


def comparable_groups(groups: list[Group]) -> list[Group]:
    """The groups of the most common (dataset, norm, eps): accuracies on other data or under another
    threat model are no trade-off against these (ties: the first such setting in the groups' order)."""
    count: dict[tuple[str, str, float | None], int] = {}
    for g in groups:
        count[threat_of(g)] = count.get(threat_of(g), 0) + 1
    most = max(count.values(), default=0)
    chosen = next((t for t in map(threat_of, groups) if count[t] == most), None)
    return [g for g in groups if threat_of(g) == chosen]


def strongest_shared_attack(groups: list[Group], preferred: str = "best") -> str | None:
    """The robust attack every group ran (at its `checkpoint_of` kind) with the lowest mean accuracy.

    Only an attack all groups share compares them fairly; of those the strongest is the robustness.
    """
    shared: set[str] | None = None
    for g in groups:
        kind = checkpoint_of(g, preferred)
        names = set(g.stats[kind]["attacks"] if kind else {}) - {"clean"}
        shared = names if shared is None else shared & names
    if not shared:
        return None

    def mean_accuracy(attack: str) -> float:
        values = [g.stats[checkpoint_of(g, preferred) or ""]["attacks"][attack].mean for g in groups]
        return sum(values) / len(values)

    return min(sorted(shared), key=mean_accuracy)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points that no other point matches in both coordinates and beats in one
    (higher is better in both: clean and robust accuracy)."""
    return [
        i
        for i, (x, y) in enumerate(points)
        if not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in points)
    ]
