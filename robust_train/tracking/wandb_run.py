"""The W&B mirror of a run. Offline by default; any W&B failure becomes a warning, never a crash."""

from __future__ import annotations

import json
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
    name: str | None = None

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

    def fail(self, message: str, details: str | None = None) -> None:
        """Close the run as failed, with the error in its summary (`error`) and notes."""

    def use_checkpoint(self, train_run_id: str | None, kind: str) -> bool:
        """Record the training run's checkpoint artifact (`model-<id>:<kind>`) as this run's input."""
        return False

    def mark_preempting(self) -> None:
        """The process is about to stop for a preemption or time-out and will be resumed later."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run with its exit code."""


# In W&B's own `wandb/` folder, per run id (`logger.dir` may be shared by many runs): the last history
# step written, so a resumed run continues its step axis.
STEP_FILE = "robust-train-step-{run_id}.json"
# The W&B run of the last attempt in this dir, for a rerun when no checkpoint says it (stopped early).
RUN_FILE = "robust-train-run.json"


class WandbTracker(Tracker):
    """Wraps a wandb run. The first error disables it with one warning; training goes on.

    Everything the run writes stays below its W&B dir (the run directory by default): W&B's staging
    copies of tables and images and its cache would otherwise go to the user's home directory, where an
    offline run copied to another machine for `wandb sync` would lose them. Every record is logged at an
    explicit step kept in `robust-train-step-<id>.json`: W&B numbers the steps of an offline run from 0 again
    when it resumes (it cannot ask the server), and the synced run would drop the resumed epochs.
    """

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
        self.name = name
        self.mode = logger.mode
        self.log_checkpoints = logger.log_checkpoints
        self.example_images = logger.example_images
        wandb_dir = Path(logger.dir or run_dir)
        self._wandb_dir = wandb_dir / "wandb"
        self.step = self._resume_step(resume_id)
        self._saved_env: dict[str, str | None] = {}
        try:
            import wandb

            self._wandb = wandb
            (wandb_dir / "wandb").mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_SILENT", "true")
            own = wandb_dir / "wandb"
            self._set_env({"WANDB_DATA_DIR": own / "data", "WANDB_CACHE_DIR": own / "cache"})
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
            try:
                (wandb_dir / "wandb" / RUN_FILE).write_text(json.dumps({"run_id": self.run_id}) + "\n")
            except OSError:
                pass
            self._run.define_metric("epoch")
            for pattern in ("train/*", "val/*", "lr"):
                self._run.define_metric(pattern, step_metric="epoch")
        except Exception as err:  # W&B must never stop training
            self._fail(err)

    def _resume_step(self, resume_id: str | None) -> int:
        """The first step of this process: one after the last one the same W&B run wrote."""
        if resume_id is None:
            return 0
        try:
            saved = json.loads(self._step_path(resume_id).read_text())
        except (OSError, ValueError):
            return 0
        if saved.get("run_id") != resume_id or not isinstance(saved.get("step"), int):
            return 0
        return int(saved["step"]) + 1

    def _step_path(self, run_id: str | None) -> Path:
        return self._wandb_dir / STEP_FILE.format(run_id=run_id)

    def _set_env(self, values: dict[str, Path]) -> None:
        for key, path in values.items():
            path.mkdir(parents=True, exist_ok=True)
            self._saved_env[key] = os.environ.get(key)
            os.environ[key] = str(path)

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    def _fail(self, err: BaseException) -> None:
        warnings.warn(
            f"W&B disabled after an error ({type(err).__name__}: {err}); local results continue",
            RuntimeWarning,
            stacklevel=3,
        )
        self._run = None
        self._restore_env()

    def _log(self, payload: dict[str, Any]) -> None:
        """One history record at the next step of this run's own step axis."""
        assert self._run is not None
        self._run.log(payload, step=self.step)
        try:
            path = self._step_path(self.run_id)
            path.write_text(json.dumps({"run_id": self.run_id, "step": self.step}) + "\n")
        except OSError:  # the step axis of a later resume may restart; the run goes on
            pass
        self.step += 1

    def log(self, metrics: dict[str, Any]) -> None:
        if self._run is None:
            return
        try:
            self._log(metrics)
        except Exception as err:
            self._fail(err)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        if self._run is None:
            return
        try:
            cols: list[str | int] = [*columns]  # wandb's annotation; the names are strings
            self._log({key: self._wandb.Table(columns=cols, data=rows)})
        except Exception as err:
            self._fail(err)

    def log_images(self, images: dict[str, Path]) -> None:
        if self._run is None:
            return
        try:
            self._log({k: self._wandb.Image(str(p)) for k, p in images.items()})
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

    def fail(self, message: str, details: str | None = None) -> None:
        if self._run is None:
            return
        try:
            # The summary's `error` is a column to filter failed runs by; the notes show the whole text.
            self._run.summary["error"] = message
            self._run.notes = message + (f"\n\n{details}" if details else "")
        except Exception as err:
            self._fail(err)
        self.finish(exit_code=1)

    def use_checkpoint(self, train_run_id: str | None, kind: str) -> bool:
        if self._run is None or not self.log_checkpoints or not train_run_id:
            return False
        if self.mode != "online":
            return False  # W&B refuses use_artifact offline; the config's checkpoint keys link the runs
        try:
            self._run.use_artifact(f"model-{train_run_id}:{kind}", type="model")
        except Exception as err:  # e.g. the training run did not upload its checkpoints
            warnings.warn(
                f"W&B: could not mark model-{train_run_id}:{kind} as this run's input ({err})",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        return True

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
            self._log({key: self._wandb.Table(columns=columns, data=data)})
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
        self._restore_env()


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


def earlier_run_id(cfg: Any, run_dir: Path) -> str | None:
    """The W&B run id of an earlier attempt in `run_dir` that stopped before its first checkpoint (which
    would otherwise carry the id): a rerun continues that run instead of leaving it orphaned."""
    if cfg is None or cfg.get("name") != "wandb" or cfg.get("mode") == "disabled" or cfg.get("dir"):
        return None  # a `logger.dir` may be shared by many runs: its file says nothing of this one
    path = Path(run_dir) / "wandb" / RUN_FILE
    try:
        run_id = json.loads(path.read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return str(run_id) if run_id else None


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
