"""The W&B mirror of a run. Offline by default; any W&B failure becomes a warning, never a crash."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any


class Tracker:
    """No-op tracker (`logger=none`); the interface the trainer and evaluator log through."""

    run_id: str | None = None
    group: str | None = None

    def log(self, metrics: dict[str, Any]) -> None:
        """Log a dict of scalars (keys like 'train/loss'; include 'epoch')."""

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """Log a table."""

    def summary(self, values: dict[str, Any]) -> None:
        """Set run-summary values."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run with its exit code."""


class WandbTracker(Tracker):
    """Wraps a wandb run. The first error disables it with one warning; training goes on."""

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        config: dict[str, Any],
        name: str,
        group: str | None,
        tags: list[str],
        resume_id: str | None,
    ) -> None:
        self._run = None
        self.run_id = resume_id
        self.group = cfg.get("group") or group
        try:
            import wandb

            self._wandb = wandb
            wandb_dir = Path(cfg.get("dir") or run_dir)
            wandb_dir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self._run = wandb.init(
                project=cfg.get("project") or "robust-train",
                entity=cfg.get("entity"),
                mode=cfg.get("mode") or "offline",
                dir=str(wandb_dir),
                name=name,
                group=self.group,
                job_type=cfg.get("job_type") or "train",
                tags=[str(t) for t in (list(cfg.get("tags") or []) + tags)],
                config=config,
                id=resume_id,
                resume="allow" if resume_id else None,
                reinit="finish_previous",
            )
            self.run_id = self._run.id
            self._run.define_metric("epoch")
            for pattern in ("train/*", "val/*", "lr"):
                self._run.define_metric(pattern, step_metric="epoch")
            self._run.define_metric("val/robust_acc", step_metric="epoch", summary="max")
            self._run.define_metric("val/clean_acc", step_metric="epoch", summary="max")
            self._run.define_metric("train/loss", step_metric="epoch", summary="min")
        except Exception as err:  # W&B must never stop training
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        warnings.warn(
            f"W&B disabled after an error ({type(err).__name__}: {err}); local results continue",
            RuntimeWarning,
            stacklevel=3,
        )
        self._run = None

    def log(self, metrics: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._run.log(metrics)
        except Exception as err:
            self._fail(err)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self._run is None:
            return
        try:
            self._run.log({key: self._wandb.Table(columns=columns, data=rows)})
        except Exception as err:
            self._fail(err)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            for k, v in values.items():
                self._run.summary[k] = v
        except Exception as err:
            self._fail(err)

    def finish(self, exit_code: int = 0) -> None:
        if self._run is None:
            return
        try:
            self._run.finish(exit_code=exit_code)
        except Exception as err:
            self._fail(err)
        self._run = None


def build_tracker(
    cfg: Any,
    run_dir: Path,
    config: dict[str, Any],
    name: str,
    group: str | None = None,
    tags: list[str] | None = None,
    resume_id: str | None = None,
) -> Tracker:
    """The tracker selected by `logger.name` (wandb or none)."""
    if cfg is None or cfg.get("name") == "none" or cfg.get("mode") == "disabled":
        return Tracker()
    return WandbTracker(cfg, run_dir, config, name, group, tags or [], resume_id)
