"""Runs as the report sees them: read from local results.json files or pulled from a W&B project."""

from __future__ import annotations

import json
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from robust_train.errors import ConfigError, ResultsError
from robust_train.schema import to_float
from robust_train.tracking.results import ce_labelled_cw
from robust_train.tracking.results import read_results as read_results_file

# Column suffix of CW numbers that an older robust-train computed with cross-entropy (ce_labelled_cw).
CE_AS_CW_MARK = " [v1: ran CE, not CW]"

RESULTS_FILE = "results.json"
ERROR_FILE = "error.json"  # written by the CLI into a multirun job's dir when the job failed


@dataclass
class RunRecord:
    """One training run: its config, per-checkpoint accuracies and validation history."""

    name: str
    config: dict[str, Any]
    seed: int | None
    # checkpoint kind (best/last/ema) -> {"epoch": int | None, "weights": "trained" | "ema" | None,
    #                                      "attacks": {attack: {"accuracy", "eps", "time_s"}}}
    checkpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "finished"  # finished | incomplete (no evaluation yet) | failed
    error: str | None = None
    n_examples: int | None = None
    # The evaluated model's name when robust-train did not train it (robust-eval of a RobustBench
    # zoo model or a plain state_dict): its results carry no defense or trainer to name it by.
    identity: str | None = None

    @property
    def paper(self) -> dict[str, Any] | None:
        paper = self.config.get("paper")
        return paper if isinstance(paper, dict) and paper.get("results") else None


def parse_eps(value: Any) -> float | None:
    """An epsilon as written in configs: a number or a fraction string like '8/255'."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return to_float(value, "eps")
    except ConfigError:
        return None


def format_eps(value: float) -> str:
    """An epsilon for people: `8/255` when it is a whole number of 255ths below 1, else a short float.

    Image budgets are chosen in 255ths; 0.0313725 tells nobody that it is 8/255.
    """
    k = value * 255
    if 0 < value < 1 and abs(k - round(k)) < 1e-6 * max(1.0, k):
        return f"{round(k)}/255"
    return f"{value:.4g}"


def run_eps(config: dict[str, Any]) -> float | None:
    """The run's threat-model eps (threat.eps, else the dataset's default): a number or '8/255'."""
    dataset = config.get("dataset")
    for node in (config.get("threat"), dataset.get("threat") if isinstance(dataset, dict) else None):
        if isinstance(node, dict) and node.get("eps") is not None:
            return parse_eps(node["eps"])
    return None


def _checkpoints_from_eval(
    evaluation: dict[str, Any], mislabelled: AbstractSet[str] = frozenset()
) -> dict[str, dict[str, Any]]:
    """Per-checkpoint accuracies; attacks in `mislabelled` get a column of their own, marked."""
    out: dict[str, dict[str, Any]] = {}
    for kind, entry in evaluation.items():
        if not isinstance(entry, dict) or "attacks" not in entry:
            continue
        attacks = {}
        for name, a in entry["attacks"].items():
            spec = a.get("attack") or {}
            # Never averaged with, or shown as, a real CW number.
            attacks[name + CE_AS_CW_MARK if name in mislabelled else name] = {
                "accuracy": float(a["accuracy"]),
                "eps": parse_eps(spec.get("eps")),
                "time_s": a.get("time_s"),
            }
        sanity = entry.get("sanity") if isinstance(entry.get("sanity"), dict) else None
        out[kind] = {
            "epoch": entry.get("epoch"),
            "weights": entry.get("weights"),  # trained | ema; absent before weight averaging existed
            "attacks": attacks,
            # Failed evaluation sanity checks (evaluation/sanity.py) travel into the report: a number
            # that a stronger attack would erase must not look like the others.
            "sanity": None if sanity is None else list(sanity.get("failed") or []),
        }
    return out


FOREIGN_SOURCES = ("robustbench", "state_dict")


def foreign_identity(node: Any) -> str | None:
    """`<source>:<name>` for results.json's `model` node of weights robust-train did not train."""
    if isinstance(node, dict) and node.get("source") in FOREIGN_SOURCES and node.get("name"):
        return f"{node['source']}:{node['name']}"
    return None


def read_results(path: Path) -> RunRecord:
    """One run from its results.json."""
    # The versioned reader refuses files from another results format version with a clear message.
    res = read_results_file(path)
    if "config" not in res:
        raise ResultsError(f"{path} is not a robust-train results.json (no 'config' key)")
    run_dir = Path(path).parent
    checkpoints = _checkpoints_from_eval(res.get("eval") or {}, ce_labelled_cw(res))
    train = res.get("train") or {}
    return RunRecord(
        name=str(run_dir),
        config=res["config"],
        seed=res.get("seed", res["config"].get("seed")),
        checkpoints=checkpoints,
        history=list(train.get("history") or []),
        status="finished" if checkpoints else "incomplete",
        n_examples=(res.get("eval") or {}).get("n_examples"),
        identity=foreign_identity(res.get("model")),
    )


def _evaluation_of_a_run_below(path: Path, root: Path) -> bool:
    """Whether `path` is a robust-eval result kept inside a training run (`<run>/eval/<suite>-<kind>-<time>/`)
    that this search also reaches: that run's own results already stand for the model, and the re-
    evaluation would count as one more seed. Name the eval folder itself to report it."""
    parents = path.resolve().parents
    if len(parents) < 3 or parents[1].name != "eval" or not (parents[2] / RESULTS_FILE).exists():
        return False
    return parents[2] == root.resolve() or root.resolve() in parents[2].parents


def load_local_runs(paths: list[Path]) -> list[RunRecord]:
    """Every run below the given run or sweep directories (results.json; failed jobs from error.json)."""
    runs: list[RunRecord] = []
    seen: set[Path] = set()
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise ResultsError(f"{root} does not exist (give run or sweep directories)")
        candidates = (
            [root] if root.is_file() else sorted(root.rglob(RESULTS_FILE)) + sorted(root.rglob(ERROR_FILE))
        )
        for f in candidates:
            run_dir = f.parent.resolve()
            if run_dir in seen or "wandb" in f.parts or _evaluation_of_a_run_below(f, root):
                continue
            seen.add(run_dir)
            error = f.parent / ERROR_FILE
            results = f.parent / RESULTS_FILE
            record = read_results(results) if results.exists() else None
            if error.exists():
                try:
                    info = json.loads(error.read_text())
                except (OSError, ValueError):
                    info = {}
                if record is None:
                    record = RunRecord(name=str(f.parent), config={}, seed=None)
                record.status, record.error = "failed", str(info.get("error", "unknown error"))
                if info.get("overrides"):
                    record.error = f"{' '.join(info['overrides'])}: {record.error}"
            if record is not None:
                runs.append(record)
    if not runs:
        raise ResultsError(f"no {RESULTS_FILE} under {' '.join(str(p) for p in paths)}")
    return runs


# ----------------------------------------------------------------------------- W&B

_HISTORY_KEYS = ["epoch", "val/clean_acc", "val/robust_acc"]
_STATE = {"finished": "finished", "failed": "failed", "crashed": "failed", "killed": "failed"}


def _wandb_record(run: Any) -> RunRecord:
    """A RunRecord from a wandb.apis.public.Run (config, summary 'eval/<kind>/<attack>', history)."""
    config = dict(run.config)
    identity = foreign_identity(config.pop("model_identity", None))
    summary = dict(run.summary)
    checkpoints: dict[str, dict[str, Any]] = {}
    eps = parse_eps((config.get("threat") or {}).get("eps"))
    for key, value in summary.items():
        parts = key.split("/")
        # eval/<kind>/<attack> holds the accuracy; eval/<kind>/<attack>/time_s the timing.
        if len(parts) == 3 and parts[0] == "eval" and parts[1] != "gap" and isinstance(value, int | float):
            entry = checkpoints.setdefault(
                parts[1], {"epoch": summary.get(f"eval_epoch/{parts[1]}"), "attacks": {}}
            )
            slot = entry["attacks"].setdefault(parts[2], {"eps": eps, "time_s": None})
            slot["accuracy"] = float(value)
        elif len(parts) == 4 and parts[0] == "eval" and parts[3] == "time_s":
            entry = checkpoints.setdefault(
                parts[1], {"epoch": summary.get(f"eval_epoch/{parts[1]}"), "attacks": {}}
            )
            entry["attacks"].setdefault(parts[2], {"eps": eps})["time_s"] = value
    for kind, entry in checkpoints.items():
        entry["attacks"] = {k: v for k, v in entry["attacks"].items() if "accuracy" in v}
        entry["weights"] = summary.get(f"eval_weights/{kind}")
    history = [dict(row) for row in run.scan_history(keys=_HISTORY_KEYS)]
    state = _STATE.get(str(getattr(run, "state", "finished")), "incomplete")
    return RunRecord(
        name=f"{run.name} ({run.id})",
        config=config,
        seed=config.get("seed"),
        checkpoints=checkpoints,
        history=history,
        status=state if (checkpoints or state == "failed") else "incomplete",
        error=f"W&B state {run.state}" if state == "failed" else None,
        n_examples=summary.get("eval/n_examples"),
        identity=identity,
    )


def _job_type(run: Any) -> str | None:
    return getattr(run, "job_type", None) or getattr(run, "jobType", None)


def load_wandb_runs(project: str, group: str | None = None, api: Any = None) -> list[RunRecord]:
    """The runs of a W&B project ("entity/project"), optionally one group (sweep) only."""
    if "/" not in project:
        raise ResultsError(f"--wandb takes ENTITY/PROJECT, got {project!r}")
    if api is None:
        import wandb

        try:
            api = wandb.Api()
        except Exception as err:  # no API key, no network: say so in one line
            raise ResultsError(f"cannot reach the W&B API ({type(err).__name__}: {err})") from err
    filters = {"group": group} if group else None
    try:
        # robust-eval runs join their training run's group; that run already stands for the model.
        runs = [_wandb_record(r) for r in api.runs(project, filters=filters) if _job_type(r) != "eval"]
    except ResultsError:
        raise
    except Exception as err:
        raise ResultsError(f"cannot read runs of {project} from W&B ({type(err).__name__}: {err})") from err
    if not runs:
        raise ResultsError(f"no runs in W&B project {project}" + (f" group {group}" if group else ""))
    return runs
