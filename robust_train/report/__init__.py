"""robust-report: tables and plots of finished runs (local results.json or a W&B project).

Runs that differ only in the seed form a group (mean +- std); runs started from an `experiment/` preset
carry the paper's numbers (`paper:` in their config), set beside ours with the difference. A report is
report.md, report.html (the same page for a browser, the plots inline) and the PNG plots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from robust_train.errors import ResultsError
from robust_train.report.aggregate import Group, Stat, group_runs, paper_rows, pareto_front, summarize
from robust_train.report.html import markdown_to_html
from robust_train.report.markdown import render
from robust_train.report.plots import (
    ATTACKS_PNG,
    EPOCHS_PNG,
    EPS_PNG,
    PARETO_PNG,
    plot_attacks,
    plot_epochs,
    plot_eps,
    plot_pareto,
)
from robust_train.report.runs import RunRecord, load_local_runs, load_wandb_runs, read_results

__all__ = [
    "Group", "Report", "RunRecord", "Stat", "build_report", "group_runs", "load_local_runs",
    "load_wandb_runs", "paper_rows", "pareto_front", "read_results", "summarize",
]  # fmt: skip

REPORT_FILE = "report.md"
HTML_FILE = "report.html"


@dataclass
class Report:
    markdown: str
    path: Path  # report.md
    groups: list[Group]
    plots: list[Path] = field(default_factory=list)
    html_path: Path | None = None  # report.html beside report.md


def build_report(runs: list[RunRecord], out_dir: Path, plots: bool = True) -> Report:
    """Write report.md, report.html and (unless `plots` is false) the PNG plots into out_dir."""
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
            lambda: plot_attacks(groups, out_dir / ATTACKS_PNG),
            lambda: plot_pareto(groups, out_dir / PARETO_PNG),
            lambda: plot_epochs(groups, out_dir / EPOCHS_PNG),
            lambda: plot_eps(runs, out_dir / EPS_PNG),
        ):
            path = maker()
            if path is not None:
                made.append(path)
    markdown = render(groups, runs, [p.name for p in made])
    path = out_dir / REPORT_FILE
    path.write_text(markdown)
    html_path = out_dir / HTML_FILE
    html_path.write_text(markdown_to_html(markdown))
    return Report(markdown, path, groups, made, html_path)
