"""Command-line entry points; the only module that touches Hydra.

`robust-train` trains (or resumes) one run per Hydra job; `robust-eval` evaluates a checkpoint;
`robust-report` tabulates and plots finished runs (no Hydra: it reads results.json files or W&B).
`robust-export` writes a checkpoint in RobustBench's model-zoo layout with a model card (no Hydra).
User errors (bad config values, missing data files, incompatible checkpoints, and Hydra's unknown keys,
groups and options) print one line and exit with code 2, without a traceback; a run refused before any
work leaves no run directory behind. In a multirun a failing job does not stop the sweep: it is
recorded in its run dir (`error.json`), its W&B run is marked failed, the other jobs go on, and the
sweep ends with a list of the failed jobs and exit code 1. The search path for plugins' and users'
config folders, nested-option completion and the rewording of Hydra's errors live in hydra_ext.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from robust_train import hydra_ext
from robust_train.console_log import console_record
from robust_train.errors import ConfigError, RobustTrainError
from robust_train.tracking.run_info import JobInfo

CONFIG_DIR = str(hydra_ext.CONFIG_DIR)
EXIT_USER_ERROR = 2
EXIT_JOB_FAILED = 1
# Ctrl-C: 128 + SIGINT, what a shell reports for a process that SIGINT ended.
EXIT_INTERRUPTED = 130
# Written into a multirun job's output dir when the job fails; removed when the job later succeeds.
JOB_ERROR_FILE = "error.json"

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml carry the launcher plugins' own names so
# that `hydra/launcher=submitit_slurm` gets our defaults; Hydra then checks them against the plugin's schema
# of the same name (what we want) and warns that this matching is deprecated on every run.
warnings.filterwarnings(
    "ignore",
    message=r"(?s).*is validated against ConfigStore schema with the same name",
    category=UserWarning,
)


def _job_context() -> tuple[Path, str | None]:
    """The job's output directory and, in a multirun, the sweep's name (the W&B group)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    return run_dir, group


def _swept_keys(sweep_dir: Path) -> list[str]:
    """The keys a multirun varies: its sweep overrides (`defense.beta=1,6`) and a sweeper's `params`.

    Read from the sweep's multirun.yaml, which the launching process writes before any job starts and
    which a SLURM job also sees (the sweep dir is on shared storage); [] when it cannot be read.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        sweep = OmegaConf.load(sweep_dir / "multirun.yaml")
        overrides = list(OmegaConf.select(sweep, "hydra.overrides.task", default=None) or [])
        params = OmegaConf.select(sweep, "hydra.sweeper.params", default=None) or {}
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a name without swept values is better than a failed job
        return []
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return keys + [str(k) for k in params if str(k) not in keys]


def _job_info() -> JobInfo:
    """This job's overrides and, in a multirun, the swept keys (for unique W&B names)."""
    if not HydraConfig.initialized():
        return JobInfo()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    num = hc.job.num if multirun else None
    return JobInfo(
        overrides=list(hc.overrides.task),
        swept=_swept_keys(Path(hc.sweep.dir)) if multirun else [],
        num=int(num) if num is not None else None,
        multirun=multirun,
        sweep_dir=str(hc.sweep.dir) if multirun else None,
    )


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _user_message(err: BaseException) -> str | None:
    """The one-line message of a user error, or None for a bug or an environment failure."""
    if isinstance(err, RobustTrainError):
        return str(err)
    if isinstance(err, OmegaConfBaseException):
        # Interpolation and type errors surface when values are read; the first line names the key.
        return str(err).strip().splitlines()[0]
    return None


def _guard(prog: str, fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    try:
        return fn(cfg)
    except (RobustTrainError, OmegaConfBaseException) as err:
        _discard_fresh_dirs()
        _fail(prog, _user_message(err) or str(err))


# Directories that did not exist when this command started (its run or sweep dir first, then the parents
# Hydra created for it), and whether they belong to a single run; set by CheckOverrides.
_fresh_dirs: list[Path] = []
_fresh_is_sweep = False
# What Hydra writes into a run dir before the task starts: a refused run may leave only these behind.
_HYDRA_FILES = {"config.yaml", "hydra.yaml", "overrides.yaml"}


def _fresh_dirs_for(run_dir: Path) -> list[Path]:
    dirs = []
    path = run_dir.absolute()
    while not path.exists() and path != path.parent:
        dirs.append(path)
        path = path.parent
    return dirs


def _holds_only_hydra_files(run_dir: Path) -> bool:
    for entry in run_dir.iterdir():
        if entry.name == ".hydra" and entry.is_dir():
            if any(not f.is_file() or f.name not in _HYDRA_FILES for f in entry.iterdir()):
                return False
        elif not (entry.is_file() and entry.suffix == ".log"):
            return False
    return True


def _discard_fresh_dirs() -> None:
    """Remove the run (or sweep) dir of a refused command if it created it and wrote nothing of its own.

    Hydra creates the run dir, `.hydra/` and the log before the task runs (a sweep dir and its
    `multirun.yaml` before it checks the sweep's options), so a config error found then would otherwise
    leave an empty-looking run behind (and a resume there would find no checkpoint). A dir that existed
    before the command, or that holds anything else, is kept.
    """
    global _fresh_dirs
    dirs, _fresh_dirs = _fresh_dirs, []
    if not dirs or not dirs[0].is_dir():
        return
    run_dir = dirs[0]
    if _fresh_is_sweep:
        if any(entry.name != "multirun.yaml" for entry in run_dir.iterdir()):
            return
    elif not HydraConfig.initialized() or Path(HydraConfig.get().runtime.output_dir).absolute() != run_dir:
        return
    elif not _holds_only_hydra_files(run_dir):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in dirs[1:]:
        try:
            parent.rmdir()
        except OSError:  # not empty: something else lives there now
            break


def _record_job_failure(prog: str, err: Exception) -> None:
    """Write error.json in the failed job's dir and say which job failed, with what."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    user = _user_message(err)
    message = user or f"{type(err).__name__}: {err}"
    record = {
        "job": hc.job.num,
        "overrides": overrides,
        "error": message,
        "type": type(err).__name__,
        "user_error": user is not None,
        "traceback": None if user else traceback.format_exc(),
    }
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / JOB_ERROR_FILE).write_text(json.dumps(record, indent=2) + "\n")
    except OSError as write_err:  # the job already failed; say so even if the disk is the problem
        print(f"{prog}: could not write {run_dir / JOB_ERROR_FILE}: {write_err}", file=sys.stderr)
    if record["traceback"]:
        print(record["traceback"], file=sys.stderr)
    print(f"{prog}: job {hc.job.num} ({' '.join(overrides)}) failed: {message}", file=sys.stderr, flush=True)


def _console_log() -> Path | None:
    """The job's log file (Hydra's `<run dir>/<job name>.log`), which gets the whole console too."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.runtime.output_dir) / f"{hc.job.name}.log"


def _run(prog: str, fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """One Hydra job, its console recorded in its log file (epoch lines, tables, warnings, errors)."""
    path = _console_log()
    with console_record(path) if path is not None else contextlib.nullcontext():
        try:
            return _run_job(prog, fn, cfg)
        except KeyboardInterrupt:
            _interrupted(prog)


def _run_job(prog: str, fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Single run: user errors exit 2. Multirun: any failure is this job's alone."""
    if not _in_multirun():
        return _guard(prog, fn, cfg)
    try:
        return fn(cfg)
    except Exception as err:
        # SystemExit (submitit's requeue after a preemption) and KeyboardInterrupt are not caught: they
        # must end the process. The return value None is a failed trial for the Optuna sweeper.
        _record_job_failure(prog, err)
        return None


def _set_job_type(cfg: DictConfig, job_type: str) -> None:
    """W&B job_type: the logger's value, else what this entry point does (train / eval).

    Only a logger whose node has the key (wandb) gets one; the others' schemas refuse it.
    """
    logger = cfg.get("logger")
    if logger is not None and "job_type" in logger and not logger.get("job_type"):
        with open_dict(cfg):
            cfg.logger.job_type = job_type


def _train(cfg: DictConfig) -> float | None:
    """Train one run; returns its best robust validation accuracy (the Optuna objective)."""
    from robust_train.commands.train import train_run

    run_dir, group = _job_context()
    _set_job_type(cfg, "train")
    results = train_run(cfg, run_dir, group, job=_job_info())
    (run_dir / JOB_ERROR_FILE).unlink(missing_ok=True)  # an earlier failure of this job is history now
    best = (results.get("train") or {}).get("best") or {}
    value = best.get("val_robust_acc")
    return None if value is None else float(value)


def _evaluate(cfg: DictConfig) -> None:
    # Which model source (checkpoint=, state_dict=, model_zoo.name=) is checked by evaluate_checkpoint.
    from robust_train.commands.evaluate import evaluate_checkpoint

    out_dir, group = _job_context()
    _set_job_type(cfg, "eval")
    evaluate_checkpoint(cfg, out_dir, group, job=_job_info())
    (out_dir / JOB_ERROR_FILE).unlink(missing_ok=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def _train_app(cfg: DictConfig) -> float | None:
    return _run("robust-train", _train, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def _eval_app(cfg: DictConfig) -> None:
    _run("robust-eval", _evaluate, cfg)


def _refuse(prog: str, message: str) -> None:
    _discard_fresh_dirs()
    _fail(prog, message)


def _main(prog: str, config_name: str, app: Callable[[], Any]) -> None:
    global _fresh_dirs
    _fresh_dirs = []
    try:
        hydra_ext.install()
    except RobustTrainError as err:  # e.g. a plugin that fails to import
        _fail(prog, str(err))
    try:
        with hydra_ext.hydra_errors_reported(prog, config_name, _refuse):
            app()
    except KeyboardInterrupt:
        _interrupted(prog)


def _interrupted(prog: str) -> None:
    """Ctrl-C outside the training loop (which checkpoints and exits by itself), or a second Ctrl-C:
    one line instead of a traceback; rerunning the same command resumes from the last checkpoint."""
    print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
    _discard_fresh_dirs()  # a run stopped before it wrote anything leaves no empty run dir behind
    sys.exit(EXIT_INTERRUPTED)


def train_main() -> None:
    """robust-train: train and evaluate one run per Hydra job."""
    _main("robust-train", "config", _train_app)


def eval_main() -> None:
    """robust-eval: evaluate a saved checkpoint."""
    _main("robust-eval", "evaluate", _eval_app)


class CheckOverrides(Callback):
    """Before any job: refuse groups the command does not use; note which directories a single run creates.

    Hydra appends `+defense=trades` to robust-eval's defaults and `+defence=trades` to the config without
    complaint; the command would then ignore them silently. This runs before Hydra creates a run dir, so
    a refused command writes nothing.
    """

    def __init__(self, prog: str = "robust-train") -> None:
        self.prog = prog

    def _check(self, config: DictConfig, config_name: str | None) -> None:
        overrides = list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
        choices = list(OmegaConf.select(config, "hydra.runtime.choices", default=None) or {})
        try:
            hydra_ext.check_group_overrides(overrides, self.prog, config_name or "config", choices)
        except ConfigError as err:
            _fail(self.prog, str(err))

    @staticmethod
    def _note_fresh_dirs(config: DictConfig, key: str) -> None:
        global _fresh_dirs, _fresh_is_sweep
        _fresh_is_sweep = key == "hydra.sweep.dir"
        try:
            _fresh_dirs = _fresh_dirs_for(Path(str(OmegaConf.select(config, key))))
        except Exception:  # an unresolvable dir fails in Hydra next, with its own message
            _fresh_dirs = []

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        self._check(config, config_name)
        self._note_fresh_dirs(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        self._check(config, config_name)
        self._note_fresh_dirs(config, "hydra.sweep.dir")


class SweepSummary(Callback):
    """At the end of a multirun (on the launching machine): list failed jobs, exit 1 if there were any."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = []
        for path in sorted(sweep_dir.glob(f"**/{JOB_ERROR_FILE}")):
            try:
                failed.append((path, json.loads(path.read_text())))
            except (OSError, ValueError):
                failed.append((path, {"error": "unreadable error record"}))
        if not failed:
            return
        lines = [f"{Path(sys.argv[0]).name}: {len(failed)} job(s) of the sweep in {sweep_dir} failed:"]
        for path, rec in failed:
            lines.append(f"  {path.parent}: {' '.join(rec.get('overrides') or [])}: {rec.get('error')}")
        print("\n".join(lines), file=sys.stderr, flush=True)
        sys.exit(EXIT_JOB_FAILED)


def report_main(argv: list[str] | None = None) -> None:
    """robust-report: markdown tables and plots of finished runs, beside the papers' numbers."""
    parser = argparse.ArgumentParser(
        prog="robust-report",
        description="Tabulate and plot runs: clean and robust accuracy per attack, mean +- std over seeds, "
        "best and last checkpoints, the paper's numbers beside presets' runs.",
    )
    parser.add_argument("paths", nargs="*", help="run or sweep directories (searched for results.json)")
    parser.add_argument("--out", default=None, help="where to write report.md and the PNGs (default: "
                        "the single PATH given, else ./report)")  # fmt: skip
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                        help="read the runs from a W&B project instead of local directories")  # fmt: skip
    parser.add_argument("--group", default=None, help="with --wandb: only runs of this W&B group (a sweep)")
    parser.add_argument("--no-plots", action="store_true",
                        help="write report.md and report.html only (no PNG plots)")  # fmt: skip
    args = parser.parse_args(argv)

    from robust_train.report import build_report, load_local_runs, load_wandb_runs

    try:
        if args.wandb:
            runs = load_wandb_runs(args.wandb, group=args.group)
            default_out = Path("report")
        else:
            if not args.paths:
                parser.error("give one or more run/sweep directories, or --wandb ENTITY/PROJECT")
            runs = load_local_runs([Path(p) for p in args.paths])
            default_out = Path(args.paths[0]) if len(args.paths) == 1 else Path("report")
        out = Path(args.out) if args.out else default_out
        report = build_report(runs, out, plots=not args.no_plots)
    except RobustTrainError as err:
        _fail("robust-report", str(err))
    print(report.markdown)
    html = f"\nhtml: {report.html_path}" if report.html_path else ""
    print(f"report: {report.path}{html}" + "".join(f"\nplot: {p}" for p in report.plots), flush=True)


def export_main(argv: list[str] | None = None) -> None:
    """robust-export: one of our checkpoints in RobustBench's model-zoo layout, with a model card."""
    parser = argparse.ArgumentParser(
        prog="robust-export",
        description="Write a checkpoint as <out>/<dataset>/<threat_model>/<name>.pt ({'state_dict': ...}, "
        "the normalization inside the model) and <name>.json (RobustBench's model_info fields, clean and "
        "AutoAttack accuracy from results.json).",
    )
    parser.add_argument("source", help="a run directory (its best.pt, or --kind) or a checkpoint file")
    parser.add_argument("--out", required=True, help="the model directory (RobustBench's model_dir)")
    parser.add_argument("--name", default=None, help="the model id (default: <run dir>_<kind>)")
    parser.add_argument("--kind", default=None, help="with a run directory: best (default), last or ema")
    parser.add_argument("--results", default=None, help="the results.json holding the checkpoint's "
                        "numbers (default: the one beside the checkpoint)")  # fmt: skip
    parser.add_argument("--allow-missing-aa", action="store_true",
                        help="write the card without an AutoAttack accuracy")  # fmt: skip
    parser.add_argument("--allow-failed-sanity", action="store_true",
                        help="export although the evaluation failed its sanity checks")  # fmt: skip
    for field in ("link", "authors", "venue", "footnote"):
        parser.add_argument(f"--{field}", default=None, help=f"the card's `{field}`")
    parser.add_argument("--title", default=None, help="the card's `name` (the paper's title)")
    args = parser.parse_args(argv)

    from robust_train.zoo import export_model

    fields = {"link": args.link, "authors": args.authors, "venue": args.venue, "footnote": args.footnote,
              "name": args.title}  # fmt: skip
    try:
        result = export_model(
            Path(args.source), Path(args.out), name=args.name, kind=args.kind,
            results=Path(args.results) if args.results else None, allow_missing_aa=args.allow_missing_aa,
            allow_failed_sanity=args.allow_failed_sanity, card_fields=fields,
        )  # fmt: skip
    except RobustTrainError as err:
        _fail("robust-export", str(err))
    for line in result.warnings:
        print(f"robust-export: warning: {line}", file=sys.stderr, flush=True)
    card = result.card_data
    print(
        f"{result.checkpoint}\n{result.card}\n{card['architecture']}, {card['dataset']} eps {card['eps']}: "
        f"clean {card['clean_acc']}%, AutoAttack {card['autoattack_acc'] or '-'}%",
        flush=True,
    )
