"""The trainer loop: epochs of training steps, per-epoch validation, checkpoints and logging."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from robust_train.addons.base import Addon
from robust_train.attacks import PGD, Clean, ThreatModel
from robust_train.config import to_float
from robust_train.data import DataBundle, augment_batch, batch_indices
from robust_train.defenses.base import Defense
from robust_train.evaluation.suite import evaluate_accuracy
from robust_train.tracking.checkpoint import rng_state, save_checkpoint, set_rng_state
from robust_train.tracking.wandb_run import Tracker
from robust_train.training.schedule import lr_at
from robust_train.training.step import TrainStep

# Offset of the data-order/augmentation generator's seed from the run seed, so it never shares a
# stream with the global generator that initializes weights and draws attack starts.
DATA_SEED_OFFSET = 1_000_003


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
    ) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.run_dir = Path(run_dir)
        self.data = data
        self.model = model
        self.defense = defense
        self.optimizer = optimizer
        self.threat = threat
        self.addons = list(addons)
        self.tracker = tracker or Tracker()
        self.checkpoint_extra = checkpoint_extra or {}
        self.on_epoch_end = on_epoch_end
        self.device = data.train_x.device
        self.step = TrainStep(model, defense, optimizer, self.addons)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(cfg.seed) + DATA_SEED_OFFSET)
        self.base_lr = to_float(self.tcfg.optimizer.lr, "trainer.optimizer.lr")
        self.epochs = int(self.tcfg.epochs)
        self.epoch = 0  # epochs completed
        self.best: dict[str, Any] = {"epoch": None, "val_robust_acc": None}
        self.history: list[dict[str, Any]] = []
        val = self.tcfg.validation
        self.val_attacks = {
            "clean": Clean(),
            "pgd": PGD(
                threat,
                steps=int(val.pgd_steps),
                step_size=to_float(cfg.threat.step, "threat.step"),
                restarts=1,
                random_start="uniform",
                bn_mode="eval",
            ),
        }

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this epoch ended."""
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["data_generator"].to("cpu"))
        set_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.best = dict(state["best"])
        self.history = list(state["history"])
        self.defense.load_state_dict(state.get("defense") or {})
        for addon in self.addons:
            addon.load_state_dict(state.get("addons", {}).get(addon.name, {}))

    def save(self, name: str) -> Path:
        path = self.run_dir / name
        save_checkpoint(self.state_dict(), path)
        return path

    # ----------------------------------------------------------------- loop
    def fit(self) -> list[dict[str, Any]]:
        """Train from `self.epoch` to the configured number of epochs."""
        for epoch in range(self.epoch, self.epochs):
            self.defense.on_epoch_start(epoch)
            for addon in self.addons:
                addon.on_epoch_start(epoch)
            record = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            for addon in self.addons:
                record.update(
                    {f"train/{k}" if "/" not in k else k: v for k, v in addon.epoch_metrics().items()}
                )
            if (epoch + 1) % int(self.tcfg.validation.every) == 0 or epoch + 1 == self.epochs:
                record.update(self.validate())
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
        return self.history

    def _batches(self, n: int) -> list[torch.Tensor]:
        drop_last = bool(self.tcfg.get("drop_last", False))
        idx = batch_indices(
            n, int(self.tcfg.batch_size), shuffle=True, generator=self.generator, drop_last=drop_last
        )
        limit = self.tcfg.get("max_batches")
        return idx[: int(limit)] if limit else idx

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        data, ds = self.data, self.cfg.dataset
        batches = self._batches(data.train_x.shape[0])
        n_batches = len(batches)
        log_every = int(self.tcfg.log_every)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        term_sums: dict[str, torch.Tensor] = {}
        seen = 0
        bar = tqdm(
            total=n_batches,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not self.tcfg.get("progress", True),
            unit="batch",
            dynamic_ncols=True,
            leave=False,
        )
        start = time.perf_counter()
        lr = self.base_lr
        for i, idx in enumerate(batches):
            lr = lr_at(self.tcfg.schedule, self.base_lr, self.epochs, epoch, i, n_batches)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x = augment_batch(
                data.train_x[idx],
                pad=int(ds.get("crop_pad", 4)),
                flip=bool(ds.get("flip", True)),
                padding_mode=str(ds.get("padding_mode", "zero")),
                generator=self.generator,
            )
            y = data.train_y[idx]
            metrics = self.step(x, y)
            loss_sum += metrics["loss"] * y.shape[0]
            correct += metrics["correct"]
            for key, value in metrics.items():
                if key not in ("loss", "correct"):
                    # Loss terms (base and add-on) accumulate on the device; read once per epoch.
                    term_sums[key] = term_sums.get(key, 0.0) + value.float() * y.shape[0]
            seen += y.shape[0]
            if (i + 1) % log_every == 0 or i + 1 == n_batches:
                # The only host sync of the loop: once per logging interval.
                elapsed = time.perf_counter() - start
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.4f}",
                    acc=f"{100.0 * correct.item() / seen:.2f}",
                    img_s=f"{seen / max(elapsed, 1e-9):.0f}",
                    lr=f"{lr:.4g}",
                    refresh=False,
                )
            bar.update(1)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
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
        limit = val.get("max_examples")
        x, y = self.data.val_x, self.data.val_y
        if limit:
            x, y = x[: int(limit)], y[: int(limit)]
        if x.shape[0] == 0:
            return {}
        bs = int(val.batch_size)
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
            parts += [
                f"val clean {r['val/clean_acc']:.2f}",
                f"val PGD-{self.val_attacks['pgd'].steps} {r['val/robust_acc']:.2f}",
            ]
        parts += [f"{r['train/img_per_s']:.0f} img/s", f"{r['train/epoch_s']:.1f} s"]
        print("  ".join(parts) + ("  *best" if improved else ""), flush=True)
