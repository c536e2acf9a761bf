"""The trainer loop: epochs of training steps, per-epoch validation, checkpoints and logging."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from tqdm import tqdm

from robust_train.addons.base import Addon
from robust_train.attacks import PGD, Clean, ThreatModel
from robust_train.data import DataBundle, augment_batch, batch_indices, check_dataset
from robust_train.data.extra import ExtraFeed, ExtraSource, default_epoch_steps
from robust_train.defenses.base import Defense
from robust_train.errors import CheckpointError, ConfigError, NumericalError
from robust_train.evaluation.suite import evaluate_accuracy
from robust_train.registry import NODE_SCHEMAS
from robust_train.schema import (
    Flag,
    NonNegativeInt,
    NonNegativeNumber,
    PositiveInt,
    PositiveNumber,
    Schema,
    ThreatConfig,
    UnitNumber,
    raise_problems,
    resolve_step,
    validate_node,
)
from robust_train.tracking.checkpoint import rng_state, save_checkpoint, set_rng_state
from robust_train.tracking.wandb_run import Tracker
from robust_train.training.callbacks import InstanceTrackingConfig
from robust_train.training.ema import EMA, EMA_KEY, EVAL_WEIGHTS_KEY, WEIGHTS_KEY
from robust_train.training.fastpath import FastConfig, FastPath
from robust_train.training.schedule import ScheduleConfig, lr_at
from robust_train.training.signals import DEFAULT_SIGNALS, StopSignals, exit_code, parse_signals
from robust_train.training.step import TrainStep

# Offset of the data-order/augmentation generator's seed from the run seed, so it never shares a
# stream with the global generator that initializes weights and draws attack starts.
DATA_SEED_OFFSET = 1_000_003


class OptimizerConfig(Schema):
    """`trainer.optimizer`: SGD with momentum, optional Nesterov, weight decay on every parameter."""

    lr: PositiveNumber = 0.1
    momentum: UnitNumber = 0.9
    nesterov: Flag = False
    weight_decay: NonNegativeNumber = 5.0e-4

    def check(self, path: str) -> list[str]:
        problems = super().check(path)
        if self.nesterov and not self.momentum > 0:
            problems.append(f"{path}.nesterov=true needs {path}.momentum > 0")
        return problems


class ValidationConfig(Schema):
    """`trainer.validation`: clean and PGD accuracy on the held-out split after every `every` epochs."""

    every: PositiveInt = 1
    pgd_steps: NonNegativeInt = 10
    max_examples: PositiveInt | None = None  # null: the whole validation split
    batch_size: PositiveInt = 256


class NanConfig(Schema):
    """`trainer.nan`: a non-finite loss, or a term above max_term in magnitude, stops the run (checked
    every log_every steps); `skip` drops batches with non-finite gradients, at most max_skips of them."""

    policy: Literal["stop", "skip"] = "stop"
    max_skips: NonNegativeInt = 0
    max_term: PositiveNumber = 1.0e6


class TrainerConfig(Schema):
    """The `trainer` node: the recipe (docs/methods/README.md#training-recipe) and the loop's settings."""

    epochs: PositiveInt = 200
    batch_size: PositiveInt = 128
    drop_last: Flag = False  # drop the last partial batch of every epoch (the reference codes keep it)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    validation: ValidationConfig = ValidationConfig()
    max_batches: PositiveInt | None = None  # stop each epoch after this many batches (debugging)
    log_every: PositiveInt = 20  # read metrics from the device every N steps (and refresh the bar)
    progress: Flag = True
    resume: Flag = True  # resume from <run dir>/last.pt when it exists
    instance_tracking: InstanceTrackingConfig = InstanceTrackingConfig()
    fast: FastConfig = FastConfig()
    nan: NanConfig = NanConfig()
    # Signals that write a mid-epoch last.pt at the next step boundary, then chain to the previously
    # installed handler (e.g. submitit's requeue) or exit with code 75; rerun in the same dir to resume.
    # Ctrl-C (SIGINT) is handled alike whatever this lists (exit code 130; a second Ctrl-C stops at once).
    stop_signals: list[str | int] = Field(default_factory=lambda: _default_signals())

    def check(self, path: str) -> list[str]:
        problems = super().check(path)
        try:
            parse_signals(self.stop_signals, f"{path}.stop_signals")
        except ConfigError as err:
            problems.append(str(err))
        return problems


NODE_SCHEMAS["trainer"] = TrainerConfig


def _default_signals() -> list[str | int]:
    return list(DEFAULT_SIGNALS)


class Trainer:
    """Trains `model` with `defense` (+ add-ons) on `data`, writing `last.pt` and `best.pt` in `run_dir`."""

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        data: DataBundle,
        model: nn.Module,
        defense: Defense,
        optimizer: torch.optim.Optimizer,
        threat: ThreatModel,
        addons: Sequence[Addon] = (),
        tracker: Tracker | None = None,
        checkpoint_extra: dict[str, Any] | None = None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.cfg = cfg
        self.tcfg = validate_node(TrainerConfig, cfg.trainer, "trainer")
        dcfg, problems = check_dataset(cfg.dataset)
        raise_problems(problems)
        assert dcfg is not None
        self.dcfg = dcfg
        threat_cfg = validate_node(ThreatConfig, cfg.threat, "threat")
        self.run_dir = Path(run_dir)
        # How to resume, said when a stop signal ends the run (a multirun job resumes with its sweep).
        self.resume_hint = f"Rerun the same command with hydra.run.dir={self.run_dir} to resume"
        self.data = data
        self.model = model
        self.defense = defense
        self.optimizer = optimizer
        self.threat = threat
        self.addons = list(addons)
        self.tracker = tracker or Tracker()
        self.checkpoint_extra = checkpoint_extra or {}
        self.on_epoch_end = on_epoch_end
        # Opt-in measurements (training/callbacks.py): on_epoch_end(trainer, epochs_done) -> metrics,
        # run before the checkpoint so their metrics land in the history, W&B and last.pt.
        self.callbacks = list(callbacks)
        self.device = data.train_x.device
        fast = FastPath.from_config(self.tcfg.fast, self.device)  # trainer.fast (README "Performance")
        self.step = TrainStep(model, defense, optimizer, self.addons, fast)
        # Weight averaging (the `ema` node, training/ema.py). None when disabled: the loop then runs
        # exactly as without it (no extra tensors, RNG draws or forwards).
        self.ema = EMA.from_config(cfg.get("ema"), model)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(cfg.seed) + DATA_SEED_OFFSET)
        self._extra: ExtraSource | None = None  # dataset.extra, mapped on first use (_plan)
        self.base_lr = self.tcfg.optimizer.lr
        self.epochs = self.tcfg.epochs
        self.epoch = 0  # epochs completed
        self.best: dict[str, Any] = {"epoch": None, "val_robust_acc": None}
        self.history: list[dict[str, Any]] = []
        # Numerical faults (trainer.nan): stop (default) or skip the batch up to max_skips times.
        self.nan_policy = self.tcfg.nan.policy
        self.max_skips = self.tcfg.nan.max_skips
        self.max_term = self.tcfg.nan.max_term
        self.skipped_steps: list[dict[str, Any]] = []
        self._skipped_now = False
        # Preemption signals (trainer.stop_signals) and Ctrl-C: checkpoint at the next step boundary.
        self.stop_signals = list(self.tcfg.stop_signals)
        self.signals: StopSignals | None = None
        self._resume: dict[str, Any] | None = None  # a mid-epoch checkpoint to continue from
        val = self.tcfg.validation
        self.val_attacks: dict[str, Any] = {
            "clean": Clean(),
            "pgd": PGD(
                threat,
                steps=val.pgd_steps,
                step_size=resolve_step(threat_cfg.step, threat.eps, "threat.step"),
                restarts=1,
                random_start="uniform",
                bn_mode="eval",
            ),
        }

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self, mid_epoch: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything needed to continue exactly where training stands.

        At an epoch boundary `mid_epoch` is None. After a stop signal it holds the running epoch, the
        next batch index, the epoch's batch order and the device-side accumulators; the data
        generator, RNG, optimizer, add-on and defense states are then those after that batch.
        """
        return {
            **self.checkpoint_extra,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data_generator": self.generator.get_state(),
            "rng": rng_state(),
            "best": dict(self.best),
            "history": list(self.history),
            "defense": self.defense.state_dict(),
            "addons": {a.name: a.state_dict() for a in self.addons},
            "wandb_run_id": self.tracker.run_id,
            "skipped_steps": list(self.skipped_steps),
            "mid_epoch": mid_epoch,
            **({EMA_KEY: self.ema.state_dict()} if self.ema is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.best = dict(state["best"])
        self.history = list(state["history"])
        self.skipped_steps = list(state.get("skipped_steps") or [])
        self._load_ema(state)
        self._restore_volatile(state)
        mid = state.get("mid_epoch")
        self._resume = state if mid else None
        if mid:
            print(
                f"resuming inside epoch {int(mid['epoch']) + 1} at step {int(mid['next_batch']) + 1}",
                flush=True,
            )

    def _restore_volatile(self, state: dict[str, Any]) -> None:
        """The states that `on_epoch_start` hooks may touch: RNGs, data generator, defense and add-ons."""
        self.generator.set_state(state["data_generator"].to("cpu"))
        set_rng_state(state["rng"])
        self.defense.load_state_dict(state.get("defense") or {})
        for addon in self.addons:
            addon.load_state_dict(state.get("addons", {}).get(addon.name, {}))

    def save(self, name: str, mid_epoch: dict[str, Any] | None = None) -> Path:
        path = self.run_dir / name
        state = self.state_dict(mid_epoch)
        if self.ema is not None:
            # best.pt is chosen on the averaged weights, so it is evaluated with them; last.pt holds
            # the trained weights for evaluation (its average is ema.pt's at the end of training).
            state[EVAL_WEIGHTS_KEY] = "ema" if name == "best.pt" else "trained"
        save_checkpoint(state, path)
        return path

    def _load_ema(self, state: dict[str, Any]) -> None:
        """The average from a checkpoint; started afresh when the checkpoint was trained without one."""
        saved = state.get(EMA_KEY)
        if self.ema is None:
            if saved:
                print("note: ema.enabled=false: the checkpoint's averaged weights are not kept", flush=True)
            return
        if saved:
            self.ema.load_state_dict(saved, where="last.pt")
        else:
            self.ema.reset()
            print("note: the checkpoint has no averaged weights; the EMA starts from its weights", flush=True)

    def save_ema(self) -> Path:
        """ema.pt: the averaged weights under `model` (evaluated as kind `ema`, exported, fine-tuned from)."""
        assert self.ema is not None
        path = self.run_dir / "ema.pt"
        state = {
            **self.checkpoint_extra,
            "epoch": self.epoch,
            "model": self.ema.weights(),
            WEIGHTS_KEY: "ema",
            EVAL_WEIGHTS_KEY: "ema",
            "ema_updates": self.ema.updates,
            "best": dict(self.best),
            "addons": {a.name: a.state_dict() for a in self.addons},  # eval-time wrappers read them
        }
        save_checkpoint(state, path)
        return path

    # ----------------------------------------------------------------- loop
    def fit(self) -> list[dict[str, Any]]:
        """Train from `self.epoch` (or the saved mid-epoch step) to the configured number of epochs."""
        with StopSignals(self.stop_signals) as signals, self._skip_guard():
            self.signals = signals
            try:
                for epoch in range(self.epoch, self.epochs):
                    self._fit_epoch(epoch)
                    if signals.requested is not None:
                        # Caught during validation or the epoch's checkpoints: last.pt is this epoch's.
                        self._interrupt(epoch, None, self.run_dir / "last.pt")
                if self.ema is not None:
                    self.save_ema()
                if signals.requested is not None:
                    # Caught while ema.pt was written: training is complete, so a rerun goes straight to
                    # evaluation; carrying on instead would ignore a Ctrl-C or a scheduler's notice.
                    self._interrupt(self.epochs - 1, None, self.run_dir / "last.pt")
            finally:
                self.signals = None
        return self.history

    def _fit_epoch(self, epoch: int) -> None:
        self.defense.on_epoch_start(epoch)
        for addon in self.addons:
            addon.on_epoch_start(epoch)
        mid = None
        if self._resume is not None and int(self._resume["mid_epoch"]["epoch"]) == epoch:
            mid = self._resume["mid_epoch"]
            # on_epoch_start may reset schedules or accumulators or draw random numbers: put back the
            # exact state saved mid-epoch on top of it, so the rest of the epoch matches a straight run.
            self._restore_volatile(self._resume)
        self._resume = None
        stats = self.train_epoch(epoch) if mid is None else self.train_epoch(epoch, mid)
        record = {"epoch": epoch + 1, **stats}
        for addon in self.addons:
            record.update({f"train/{k}" if "/" not in k else k: v for k, v in addon.epoch_metrics().items()})
        if (epoch + 1) % self.tcfg.validation.every == 0 or epoch + 1 == self.epochs:
            record.update(self.validate())
        for callback in self.callbacks:
            record.update(callback.on_epoch_end(self, epoch + 1))
        self.epoch = epoch + 1
        improved = record.get("val/robust_acc") is not None and (
            self.best["val_robust_acc"] is None or record["val/robust_acc"] > self.best["val_robust_acc"]
        )
        if improved:
            self.best = {"epoch": epoch + 1, "val_robust_acc": record["val/robust_acc"]}
        self.history.append(record)
        # last.pt first: a crash between the two writes loses no progress.
        self.save("last.pt")
        if improved:
            self.save("best.pt")
        self.tracker.log(record)
        self._print_epoch(record, improved)
        if self.on_epoch_end is not None:
            self.on_epoch_end(record)

    def _interrupt(self, epoch: int, step: int | None, path: Path) -> None:
        assert self.signals is not None and self.signals.requested is not None
        sig = self.signals.requested
        where = f"epoch {epoch + 1}, step {step}" if step is not None else f"the end of epoch {epoch + 1}"
        self.signals.deliver(
            f"robust-train: stopped by {sig.name} at {where}; checkpoint {path} written. {self.resume_hint} "
            f"(exit code {exit_code(sig)})."
        )

    @contextmanager
    def _skip_guard(self) -> Iterator[None]:
        """Under trainer.nan.policy=skip, turn an optimizer step with non-finite gradients into a no-op.

        Knowing before the update costs one host sync per step, which only this policy pays: a step
        pre-hook reduces the gradient norms on the device and reads one flag. Dropping every `.grad`
        makes SGD (and every torch optimizer) leave parameters and momentum untouched; the trainer
        then puts back the parameters and BatchNorm buffers that the forward or a weight perturbation
        may have changed.
        """
        if self.nan_policy != "skip":
            yield
            return

        def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if not params:
                return
            total = torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]).sum()
            if not bool(torch.isfinite(total)):
                for p in params:
                    p.grad = None
                self._skipped_now = True

        handle = self.optimizer.register_step_pre_hook(pre_hook)
        try:
            yield
        finally:
            handle.remove()

    def _batches(self, n: int) -> list[torch.Tensor]:
        idx = batch_indices(
            n, self.tcfg.batch_size, shuffle=True, generator=self.generator, drop_last=self.tcfg.drop_last
        )
        limit = self.tcfg.max_batches
        return idx[:limit] if limit else idx

    def _extra_source(self) -> ExtraSource | None:
        """dataset.extra mapped read-only (data/extra.py), checked against the loaded data once."""
        if not self.dcfg.extra:
            return None
        if self._extra is None:
            from robust_train.data.extra import check_extra_files

            raise_problems(check_extra_files(self.dcfg.extra, self.data.image_shape, self.data.num_classes))
            self._extra = ExtraSource(self.dcfg.extra, int(self.cfg.seed))
        return self._extra

    def _plan(self, epoch: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """The epoch's batches: training-set indices per step and, with dataset.extra, the extra-image
        indices per step (None without). Without extra data this is exactly `_batches`."""
        n = self.data.train_x.shape[0]
        extra = self._extra_source()
        if extra is None:
            return self._batches(n), None
        bs, ds = self.tcfg.batch_size, self.dcfg
        steps = ds.epoch_steps or default_epoch_steps(n, bs)
        if self.tcfg.max_batches:
            steps = min(steps, self.tcfg.max_batches)
        plan = extra.plan(epoch, n, bs, ds.extra_fraction, steps, self.generator)
        return plan.orig, plan.extra

    def _resume_plan(self, mid: dict[str, Any]) -> list[torch.Tensor] | None:
        """The extra-image plan saved mid-epoch, checked against the extra files this run maps."""
        extra = self._extra_source()
        saved = mid.get("extra")
        if saved is None and extra is None:
            return None
        if saved is None or extra is None or int(mid.get("extra_size", -1)) != len(extra):
            before = "no extra images" if saved is None else f"{mid.get('extra_size')} extra images"
            now = "none" if extra is None else f"{len(extra)} images"
            raise CheckpointError(
                f"last.pt was written mid-epoch with {before}, but dataset.extra now gives {now}; resume "
                "with the same dataset.extra files, or choose a new hydra.run.dir"
            )
        return [t.cpu() for t in saved]

    def _feed(self, extra: list[torch.Tensor] | None, first: int) -> ExtraFeed | None:
        """The background reader of the extra images of steps first.. (None without extra data)."""
        source = self._extra_source()
        return None if extra is None or source is None else source.feed(extra[first:], self.device)

    def _images(self, idx: torch.Tensor, feed: ExtraFeed | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's uint8 images and labels: training images `idx`, then the step's extra images."""
        data = self.data
        if feed is None:
            return data.train_x[idx], data.train_y[idx]
        more_x, more_y = feed.next()
        return torch.cat([data.train_x[idx], more_x]), torch.cat([data.train_y[idx], more_y])

    def _skip_step(self, epoch: int, i: int, n_batches: int, metrics: dict[str, torch.Tensor]) -> None:
        terms = {k: float(v) for k, v in metrics.items() if k != "correct"}
        self.skipped_steps.append({"epoch": epoch + 1, "step": i + 1, "terms": terms})
        text = ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
        where = f"epoch {epoch + 1}, step {i + 1}/{n_batches}"
        if len(self.skipped_steps) > self.max_skips:
            raise NumericalError(
                f"training stopped: non-finite gradients at {where} ({text}), more than "
                f"trainer.nan.max_skips={self.max_skips} skipped batches; last.pt holds the last good "
                "state. Lower trainer.optimizer.lr or an add-on's strength"
            )
        print(
            f"warning: skipped the batch at {where}: non-finite gradients ({text}); "
            f"{len(self.skipped_steps)}/{self.max_skips} skips used",
            flush=True,
        )

    def train_epoch(self, epoch: int, mid: dict[str, Any] | None = None) -> dict[str, Any]:
        ds = self.dcfg
        log_every = self.tcfg.log_every
        if mid is None:
            batches, extra = self._plan(epoch)
            first = 0
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), dtype=torch.long, device=self.device)
            term_sums: dict[str, torch.Tensor] = {}
            seen, elapsed_before = 0, 0.0
        else:
            batches = [b.to(self.device) for b in mid["batches"]]
            extra = self._resume_plan(mid)
            first = int(mid["next_batch"])
            loss_sum = mid["loss_sum"].to(self.device)
            correct = mid["correct"].to(self.device)
            term_sums = {k: v.to(self.device) for k, v in mid["term_sums"].items()}
            seen, elapsed_before = int(mid["seen"]), float(mid["elapsed"])
        n_batches = len(batches)
        feed = self._feed(extra, first)  # extra images read ahead in the background; None without
        if self.ema is not None:
            self.ema.plan(self.epochs * n_batches)  # fixes ema.start in steps, once per run
        guard = NanGuard(self.device, self.max_term)
        skip = self.nan_policy == "skip"
        bar = tqdm(
            total=n_batches,
            initial=first,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not self.tcfg.progress,
            unit="batch",
            dynamic_ncols=True,
            leave=False,
        )
        start = time.perf_counter()
        lr = self.base_lr
        for i in range(first, n_batches):
            idx = batches[i]
            lr = lr_at(self.tcfg.schedule, self.base_lr, self.epochs, epoch, i, n_batches)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images, y = self._images(idx, feed)
            x = augment_batch(
                images,
                pad=ds.crop_pad,
                flip=ds.flip,
                padding_mode=ds.padding_mode,
                generator=self.generator,
            )
            snapshot = [t.detach().clone() for t in self.model.state_dict().values()] if skip else None
            self._skipped_now = False
            metrics = self.step(x, y)
            if self._skipped_now and snapshot is not None:
                with torch.no_grad():
                    for t, saved in zip(self.model.state_dict().values(), snapshot, strict=True):
                        t.copy_(saved)
                self._skip_step(epoch, i, n_batches, metrics)
            else:
                if self.ema is not None:
                    self.ema.update()  # after the optimizer step and any weight perturbation's removal
                guard.update(metrics, i)
                loss_sum += metrics["loss"] * y.shape[0]
                correct += metrics["correct"]
                for key, value in metrics.items():
                    if key not in ("loss", "correct"):
                        # Loss terms (base and add-on) accumulate on the device; read once per epoch.
                        term_sums[key] = term_sums.get(key, 0.0) + value.float() * y.shape[0]
                seen += y.shape[0]
            stop = self.signals is not None and self.signals.requested is not None
            if (i + 1) % log_every == 0 or i + 1 == n_batches or stop:
                # The only host syncs of the loop: once per logging interval (and before a checkpoint).
                guard.check(epoch, n_batches, i)
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{loss_sum.item() / max(seen, 1):.4f}",
                    acc=f"{100.0 * correct.item() / max(seen, 1):.2f}",
                    img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                    lr=f"{lr:.4g}",
                    refresh=False,
                )
            bar.update(1)
            if stop:
                bar.close()
                mid_state = {
                    "epoch": epoch,
                    "next_batch": i + 1,
                    "batches": batches,
                    "loss_sum": loss_sum,
                    "correct": correct,
                    "term_sums": term_sums,
                    "seen": seen,
                    "elapsed": elapsed_before + time.perf_counter() - start,
                }
                if feed is not None:
                    feed.close()
                    # The epoch's extra-image plan, and the size of the set it indexes (checked on resume).
                    mid_state["extra"] = extra
                    mid_state["extra_size"] = len(self._extra) if self._extra is not None else 0
                self._interrupt(epoch, i + 1, self.save("last.pt", mid_state))
        bar.close()
        if feed is not None:
            feed.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = elapsed_before + time.perf_counter() - start
        terms = {f"train/{key}": float(total) / max(seen, 1) for key, total in term_sums.items()}
        return {
            **terms,
            "train/loss": loss_sum.item() / max(seen, 1),
            "train/acc": 100.0 * correct.item() / max(seen, 1),
            "train/img_per_s": seen / max(elapsed, 1e-9),
            "train/epoch_s": elapsed,
            "lr": lr,
        }

    def validate(self) -> dict[str, Any]:
        """Clean and PGD accuracy on the held-out validation split (never the test set)."""
        val = self.tcfg.validation
        limit = val.max_examples
        x, y = self.data.val_x, self.data.val_y
        if limit:
            x, y = x[:limit], y[:limit]
        if x.shape[0] == 0:
            return {}
        bs = val.batch_size
        # With weight averaging, validation (and so best.pt's selection) runs on the averaged weights.
        with self.ema.applied() if self.ema is not None else nullcontext():
            clean = evaluate_accuracy(self.model, self.val_attacks["clean"], x, y, bs)
            robust = evaluate_accuracy(self.model, self.val_attacks["pgd"], x, y, bs)
        return {
            "val/clean_acc": clean["accuracy"],
            "val/robust_acc": robust["accuracy"],
            "val/time_s": clean["time_s"] + robust["time_s"],
        }

    def _print_epoch(self, r: dict[str, Any], improved: bool) -> None:
        parts = [
            f"epoch {r['epoch']}/{self.epochs}",
            f"loss {r['train/loss']:.4f}",
            f"train acc {r['train/acc']:.2f}",
        ]
        if "val/clean_acc" in r:
            val = "val(ema)" if self.ema is not None else "val"
            parts += [
                f"{val} clean {r['val/clean_acc']:.2f}",
                f"{val} PGD-{self.val_attacks['pgd'].steps} {r['val/robust_acc']:.2f}",
            ]
        parts += [f"{r['train/img_per_s']:.0f} img/s", f"{r['train/epoch_s']:.1f} s"]
        print("  ".join(parts) + ("  *best" if improved else ""), flush=True)


class NanGuard:
    """Watches the step's loss and terms for non-finite or exploding values without a per-step sync.

    Each step adds a few device ops: is any value non-finite or above `max_term` in magnitude, and if
    this is the first bad step, remember its index and values. `check` reads the flag once per
    logging interval (where the loop syncs anyway) and stops training with a message naming the epoch,
    the first bad step and its loss terms. The weights updated after that step are never checkpointed:
    `last.pt` keeps the state of the last finished epoch (or of the last stop signal).
    """

    def __init__(self, device: torch.device, max_term: float) -> None:
        self.device = device
        self.max_term = max_term
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.keys: list[str] | None = None
        self.values: torch.Tensor | None = None

    def update(self, metrics: dict[str, torch.Tensor], step: int) -> None:
        if self.keys is None:
            self.keys = [k for k in metrics if k != "correct"]
            self.values = torch.zeros(len(self.keys), device=self.device)
        zero = torch.zeros((), device=self.device)
        vals = torch.stack(
            [metrics[k].detach().float().reshape(()) if k in metrics else zero for k in self.keys]
        )
        bad = ~torch.isfinite(vals).all() | (vals.abs() > self.max_term).any()
        first = bad & ~self.bad
        self.first_step = torch.where(first, step, self.first_step)
        assert self.values is not None  # set with the keys on the first update
        self.values = torch.where(first, vals, self.values)
        self.bad = self.bad | bad

    def check(self, epoch: int, n_batches: int, detected_at: int) -> None:
        """Raise NumericalError if any step since the epoch started was bad (one host sync)."""
        if self.keys is None or not bool(self.bad):
            return
        step = int(self.first_step) + 1
        values = self.values.tolist() if self.values is not None else []
        finite = all(math.isfinite(v) for v in values)
        kind = f"exploding (a term above trainer.nan.max_term={self.max_term:g})" if finite else "non-finite"
        terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.keys, values, strict=True))
        raise NumericalError(
            f"training stopped: {kind} loss at epoch {epoch + 1}, step {step}/{n_batches} ({terms}); "
            f"detected at step {detected_at + 1} (checked every trainer.log_every steps). The weights after "
            "it are not saved: last.pt holds the last good state. Lower trainer.optimizer.lr or an "
            "add-on's strength, or set trainer.nan.policy=skip with trainer.nan.max_skips=N"
        )
