"""The W&B mirror of a run. Offline by default; any W&B failure becomes a warning, never a crash."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

from robust_train.registry import NODE_SCHEMAS
from robust_train.schema import Flag, NonNegativeInt, Schema, validate_node


class WandbLoggerConfig(Schema):
    """`logger=wandb`: Weights & Biases; offline needs no account (sync later with `wandb sync`)."""

    name: Literal["wandb"] = "wandb"
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "robust-train"
    entity: str | None = None
    group: str | None = None  # null: the sweep's name in a multirun, none for a single run
    job_type: str | None = None  # null: train for robust-train, eval for robust-eval
    tags: list[str] = []
    dir: str | None = None  # null: the run directory
    # Upload best.pt and last.pt as versions of a W&B model artifact with aliases best / last.
    log_checkpoints: Flag = False
    # Test images in the W&B table eval/examples (clean and adversarial, per attack); 0: no table.
    example_images: NonNegativeInt = 8


class NoLoggerConfig(Schema):
    """`logger=none`: results.json and the console only."""

    name: Literal["none"] = "none"


LOGGERS: dict[str, type[Schema]] = {"wandb": WandbLoggerConfig, "none": NoLoggerConfig}

NODE_SCHEMAS.update({"logger/wandb": WandbLoggerConfig, "logger/none": NoLoggerConfig})


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

    def log_images(self, images: dict[str, Path]) -> None:
        """Log image files (PNG plots) under their keys."""

    def log_checkpoint(self, path: Path, aliases: list[str]) -> None:
        """Upload a checkpoint as a version of this run's model artifact, with aliases (best, last)."""

    def log_examples(
        self, key: str, model: Any, attacks: dict[str, Any], x_uint8: Any, y: Any, checkpoint: str
    ) -> None:
        """A table of clean and adversarial example images with the model's predictions, per attack."""

    def mark_preempting(self) -> None:
        """The process is about to stop for a preemption or time-out and will be resumed later."""

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
        logger = (
            cfg if isinstance(cfg, WandbLoggerConfig) else validate_node(WandbLoggerConfig, cfg, "logger")
        )
        self._run = None
        self.run_id = resume_id
        self.group = logger.group or group
        self.log_checkpoints = logger.log_checkpoints
        self.example_images = logger.example_images
        try:
            import wandb

            self._wandb = wandb
            wandb_dir = Path(logger.dir or run_dir)
            wandb_dir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            self._run = wandb.init(
                project=logger.project,
                entity=logger.entity,
                mode=logger.mode,
                dir=str(wandb_dir),
                name=name,
                group=self.group,
                job_type=logger.job_type or "train",
                tags=[str(t) for t in (list(logger.tags) + tags)],
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
            cols: list[str | int] = [*columns]  # wandb's annotation; the names are strings
            self._run.log({key: self._wandb.Table(columns=cols, data=rows)})
        except Exception as err:
            self._fail(err)

    def log_images(self, images: dict[str, Path]) -> None:
        if self._run is None:
            return
        try:
            self._run.log({k: self._wandb.Image(str(p)) for k, p in images.items()})
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

    def log_checkpoint(self, path: Path, aliases: list[str]) -> None:
        if self._run is None or not self.log_checkpoints or not Path(path).exists():
            return
        try:
            # One artifact per run; each upload is a version. Identical files (best.pt == last.pt at the
            # same epoch) deduplicate into one version carrying both aliases.
            art = self._wandb.Artifact(
                f"model-{self._run.id}", type="model", metadata={"file": Path(path).name}
            )
            art.add_file(str(path), name="checkpoint.pt")
            self._run.log_artifact(art, aliases=list(aliases))
        except Exception as err:
            self._fail(err)

    def log_examples(
        self, key: str, model: Any, attacks: dict[str, Any], x_uint8: Any, y: Any, checkpoint: str
    ) -> None:
        if self._run is None or self.example_images <= 0:
            return
        try:
            rows = example_rows(model, attacks, x_uint8[: self.example_images], y[: self.example_images])
            columns: list[str | int] = ["checkpoint", "attack", "index", "label", "clean", "clean_pred",
                                        "adversarial", "adv_pred", "correct", "linf"]  # fmt: skip
            image = self._wandb.Image
            data = [
                [checkpoint, r["attack"], r["index"], r["label"], image(r["clean"]), r["clean_pred"],
                 image(r["adversarial"]), r["adv_pred"], r["correct"], r["linf"]]
                for r in rows
            ]  # fmt: skip
            self._run.log({key: self._wandb.Table(columns=columns, data=data)})
        except Exception as err:
            self._fail(err)

    def mark_preempting(self) -> None:
        if self._run is None:
            return
        try:
            # W&B shows the run as preempted (not failed) if it stops now; the resumed job continues it.
            self._run.mark_preempting()
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


def example_rows(model: Any, attacks: dict[str, Any], x_uint8: Any, y: Any) -> list[dict[str, Any]]:
    """Per attack and example: clean and adversarial images (HWC float in [0, 1]) and predictions."""
    import torch

    x = x_uint8.to(torch.float32).div(255)
    was_training = model.training
    model.eval()
    rows: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            clean_pred = model(x).argmax(1)
        for name, attack in attacks.items():
            x_adv = attack(model, x, y).detach()
            with torch.no_grad():
                adv_pred = model(x_adv).argmax(1)
            linf = (x_adv - x).flatten(1).abs().amax(1)
            for i in range(x.shape[0]):
                rows.append(
                    {
                        "attack": name,
                        "index": i,
                        "label": int(y[i]),
                        "clean": x[i].permute(1, 2, 0).cpu().numpy(),
                        "clean_pred": int(clean_pred[i]),
                        "adversarial": x_adv[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(),
                        "adv_pred": int(adv_pred[i]),
                        "correct": bool(adv_pred[i] == y[i]),
                        "linf": float(linf[i]),
                    }
                )
    finally:
        model.train(was_training)
    return rows


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
