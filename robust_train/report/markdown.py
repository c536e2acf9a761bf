"""The markdown report: accuracy per attack (mean +- std over seeds), the papers beside, failed runs."""

from __future__ import annotations

from robust_train.report.aggregate import Group, paper_rows
from robust_train.report.plots import CAPTIONS
from robust_train.report.runs import CE_AS_CW_MARK, RunRecord
from robust_train.tracking.results import checkpoint_label


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def accuracy_table(groups: list[Group]) -> list[str]:
    attacks: list[str] = []
    for g in groups:
        attacks += [a for a in g.attacks if a not in attacks]
    rows = []
    for g in groups:
        for kind, entry in g.stats.items():
            epoch = entry["epoch"]
            label = checkpoint_label(kind, entry)  # `best (ema)`: best.pt evaluated with averaged weights
            rows.append(
                [g.label, label, str(len(g.runs)), "-" if epoch is None else epoch.fmt(1)]
                + [entry["attacks"][a].fmt() if a in entry["attacks"] else "-" for a in attacks]
            )
    return _table(["method", "checkpoint", "seeds", "epoch", *attacks], rows)


def timing_table(groups: list[Group]) -> list[str]:
    attacks: list[str] = []
    for g in groups:
        for entry in g.stats.values():
            attacks += [a for a in entry.get("time_s", {}) if a not in attacks]
    if not attacks:
        return []
    rows = []
    for g in groups:
        entry = g.stats.get("best") or next(iter(g.stats.values()))
        times = entry.get("time_s", {})
        rows.append([g.label] + [f"{times[a].mean:.1f}" if a in times else "-" for a in attacks])
    return _table(["method", *attacks], rows)


def paper_table(groups: list[Group]) -> tuple[list[str], list[str]]:
    rows, notes = [], []
    for g in groups:
        found, missing = paper_rows(g)
        for p in found:
            rows.append(
                [g.label, p.row, p.checkpoint, p.attack, p.paper_text(), p.ours.fmt(), f"{p.diff:+.2f}"]
            )
        if g.paper:
            src = g.paper.get("source") or g.paper.get("method")
            verified = "" if g.paper.get("verified") else " (not verified)"
            notes.append(f"- {g.label}: {src}{verified}")
            if missing:
                notes.append(f"  - paper columns without an attack here: {', '.join(missing)}")
    if not rows:
        return [], notes
    return _table(
        ["method", "paper row", "ours", "attack", "paper", "ours (mean ± std)", "ours − paper"], rows
    ), notes


def render(groups: list[Group], runs: list[RunRecord], plots: list[str]) -> str:
    finished = [r for r in runs if r.checkpoints]
    n_examples = sorted({r.n_examples for r in finished if r.n_examples})
    out = ["# robust-train report", ""]
    out.append(
        f"{len(finished)} evaluated run(s) in {len(groups)} group(s) (runs that differ only in the seed); "
        "accuracy in %, mean ± sample std over seeds."
    )
    if n_examples:
        out.append(f"Test images per evaluation: {', '.join(str(n) for n in n_examples)}.")
    out += ["", "## Accuracy per attack", ""] + accuracy_table(groups) + _labels_notes(groups)
    if plots:
        out += _plots_section(plots)
    if any(a.endswith(CE_AS_CW_MARK) for g in groups for a in g.attacks):
        out += [
            "",
            f"**Columns marked `{CE_AS_CW_MARK.strip()}` come from results files of format version 1, whose "
            "CW attacks ascended cross-entropy: they are PGD numbers, not Carlini-Wagner ones. Rerun "
            "`robust-eval` on those checkpoints for real CW numbers.**",
        ]
    table, notes = paper_table(groups)
    if table or notes:
        out += ["", "## Beside the papers", ""]
        if table:
            out += [
                "`ours` is our checkpoint compared: the paper row's own kind (best/last) or best. "
                "A range is a sanity range; its difference is the distance outside it.",
                "",
                *table,
                "",
            ]
        out += notes
    timing = timing_table(groups)
    if timing:
        out += ["", "## Evaluation time per attack (s, best checkpoint, mean over seeds)", "", *timing]
    out += ["", "## Runs", ""]
    run_rows = []
    for g in groups:
        for r in g.runs:
            best = r.checkpoints.get("best") or next(iter(r.checkpoints.values()))
            robust = [a for a in best["attacks"] if a != "clean"]
            first = f"{robust[0]} {best['attacks'][robust[0]]['accuracy']:.2f}" if robust else "-"
            run_rows.append([f"`{r.name}`", g.label, str(r.seed), r.status, first, _sanity_cell(r)])
    out += _table(["run", "method", "seed", "status", "first robust attack (best)", "sanity"], run_rows)
    others = [r for r in runs if not r.checkpoints]
    if others:
        out += ["", "## Failed or unfinished runs", ""]
        for r in others:
            out.append(f"- `{r.name}`: {r.status}" + (f": {r.error}" if r.error else ""))
    return "\n".join(out) + "\n"


def _plots_section(plots: list[str]) -> list[str]:
    out = ["", "## Plots", ""]
    for p in plots:
        out += [f"![{CAPTIONS.get(p, p)}]({p})", ""]
    return out[:-1]


def _labels_notes(groups: list[Group]) -> list[str]:
    """The whole label of groups whose label was cut for the tables and legends."""
    cut = [g for g in groups if g.full_label]
    if not cut:
        return []
    return ["", "Labels cut short above, in full:", ""] + [f"- {g.label}: {g.full_label}" for g in cut]


def _sanity_cell(run: RunRecord) -> str:
    """`ok`, `FAILED: <checks>` per checkpoint, or `-` when the run recorded no sanity checks."""
    cells = []
    for kind, entry in run.checkpoints.items():
        failed = entry.get("sanity")
        if failed is not None:
            cells.append(f"{kind} " + (f"**FAILED: {', '.join(failed)}**" if failed else "ok"))
    return "; ".join(cells) or "-"
