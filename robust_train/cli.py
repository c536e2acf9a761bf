"""Command-line entry points; the only module that touches Hydra.

`robust-train` trains (or resumes) one run per Hydra job; `robust-eval` evaluates a checkpoint.
User errors (bad config values, missing data files, incompatible checkpoints) print one message and
exit with code 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robust_train.errors import RobustTrainError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
EXIT_USER_ERROR = 2


def _job_context() -> tuple[Path, str | None]:
    """The job's output directory and, in a multirun, the sweep's name (the W&B group)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    group = Path(hc.sweep.dir).name if hc.mode == RunMode.MULTIRUN else None
    return run_dir, group


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _guard(prog: str, fn, cfg: DictConfig) -> None:
    try:
        fn(cfg)
    except RobustTrainError as err:
        _fail(prog, str(err))
    except OmegaConfBaseException as err:
        # Interpolation and type errors surface when values are read; the first line names the key.
        _fail(prog, str(err).strip().splitlines()[0])


def _train(cfg: DictConfig) -> None:
    from robust_train.training.run import train_run

    run_dir, group = _job_context()
    train_run(cfg, run_dir, group)


def _evaluate(cfg: DictConfig) -> None:
    from robust_train.evaluation.run import evaluate_checkpoint

    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise_missing = "checkpoint is required: robust-eval checkpoint=outputs/.../best.pt"
        _fail("robust-eval", raise_missing)
    out_dir, group = _job_context()
    evaluate_checkpoint(cfg, out_dir, group)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def train_main(cfg: DictConfig) -> None:
    """robust-train: train and evaluate one run per Hydra job."""
    _guard("robust-train", _train, cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def eval_main(cfg: DictConfig) -> None:
    """robust-eval: evaluate a saved checkpoint."""
    _guard("robust-eval", _evaluate, cfg)
