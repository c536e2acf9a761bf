"""robust-report: tables and plots of finished runs (local results.json or a W&B project).

Runs that differ only in the seed form a group (mean +- std); runs started from an `experiment/` preset
carry the paper's numbers (`paper:` in their config), set beside ours with the difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from robust_train.errors import ResultsError
from robust_train.report.aggregate import Group, Stat, group_runs, paper_rows, summarize
from robust_train.report.markdown import render
from robust_train.report.plots import plot_attacks, plot_epochs, plot_eps
from robust_train.report.runs import RunRecord, load_local_runs, load_wandb_runs, read_results

__all__ = [
    "Group", "Report", "RunRecord", "Stat", "build_report", "group_runs", "load_local_runs",
    "load_wandb_runs", "paper_rows", "read_results", "summarize",
]  # fmt: skip

REPORT_FILE = "report.md"


@dataclass
class Report:
    markdown: str
    path: Path
    groups: list[Group]
    plots: list[Path] = field(default_factory=list)


def build_report(runs: list[RunRecord], out_dir: Path, plots: bool = True) -> Report:
    """Write report.md (and the PNG plots) into out_dir."""
    groups = group_runs(runs)
    if not groups:
        raise ResultsError("none of the runs has evaluation results yet (all failed or unfinished)")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ResultsError(f"cannot create the report directory {out_dir}: {err}") from err
    made: list[Path] = []
    if plots:
        for maker in (
            lambda: plot_attacks(groups, out_dir / "robust_by_attack.png"),
            lambda: plot_epochs(groups, out_dir / "accuracy_vs_epoch.png"),
            lambda: plot_eps(runs, out_dir / "robust_vs_eps.png"),
        ):
            path = maker()
            if path is not None:
                made.append(path)
    markdown = render(groups, runs, [p.name for p in made])
    path = out_dir / REPORT_FILE
    path.write_text(markdown)
    return Report(markdown, path, groups, made)
