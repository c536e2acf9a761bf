"""Where robust-eval reads a run and writes its results: beside the checkpoint it evaluates.

`checkpoint=` may name a checkpoint file or a training run's directory (its best.pt); the results go
to `<run dir>/eval/<suite>-<checkpoint>-<time>/` (e.g. `quick-best-2026-12-06_10-30-00`), so a run's
evaluations stay with the run that trained the model, and evaluations of best.pt and last.pt started
in the same second do not share a folder.
Weights from elsewhere (`state_dict=`, `model_zoo.name=`) keep `outputs/eval/<date>/<time>`. No torch
here: Hydra resolves the output directory (through the `robust_eval_dir` resolver) before a job runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robust_train.errors import CheckpointError

# What `checkpoint=<run dir>` evaluates, in order of preference.
RUN_DIR_CHECKPOINTS = ("best.pt",)
DEFAULT_EVAL_ROOT = "outputs/eval"


def checkpoint_file(path: Path | str) -> Path:
    """A checkpoint file as given, or the best.pt of a run directory; CheckpointError for a directory
    that holds none."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in RUN_DIR_CHECKPOINTS:
        if (path / name).is_file():
            return path / name
    found = sorted(p.name for p in path.glob("*.pt"))
    raise CheckpointError(
        f"checkpoint={path} is a directory without {' or '.join(RUN_DIR_CHECKPOINTS)}"
        + (f"; it holds {', '.join(found)}: name one, e.g. checkpoint={path / found[0]}" if found else
           "; give a run directory of robust-train or a checkpoint file")
    )  # fmt: skip


def _stored_suite(run_dir: Path) -> str | None:
    """The suite name a training run was evaluated with (its results.json), without loading weights."""
    try:
        config = json.loads((run_dir / "results.json").read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    name = (config.get("eval") or {}).get("name") if isinstance(config, dict) else None
    return str(name) if name else None


def _chose_suite(overrides: Sequence[Any]) -> bool:
    return any(str(o).lstrip("+~").split("=", 1)[0] == "eval" for o in overrides or ())


def eval_dir(checkpoint: Any, suite: Any, overrides: Sequence[Any] | None, stamp: str) -> str:
    """The output directory of a robust-eval run (the value of `hydra.run.dir`).

    With a checkpoint: `<its run dir>/eval/<suite>-<kind>-<stamp>`, where the suite is the one chosen
    with `eval=` or else the one stored with the run (which is what runs then), and the kind the
    checkpoint's name (best for a run directory). Otherwise
    `outputs/eval/<stamp>` with the stamp's date and time as folders.
    """
    if checkpoint in (None, "", "None"):
        date, _, time = stamp.partition("_")
        return f"{DEFAULT_EVAL_ROOT}/{date}/{time or date}"
    path = Path(str(checkpoint))
    run_dir, kind = (path, Path(RUN_DIR_CHECKPOINTS[0]).stem) if path.is_dir() else (path.parent, path.stem)
    name = str(suite) if _chose_suite(overrides or ()) else (_stored_suite(run_dir) or str(suite))
    return str(run_dir / "eval" / f"{name or 'eval'}-{kind}-{stamp}")
