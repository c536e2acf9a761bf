"""Opt-in training callbacks that run after each epoch's validation, before the checkpoint is written.

`InstanceTracking` (trainer.instance_tracking.enabled=true) follows a fixed subset of examples through
training, docs/methods/iseat.md#analysis: per example and tracked epoch, the clean and PGD losses and
correctness and the
adversarial vulnerability AV = CE(x_adv) - CE(x) (Eq. 3, at the unperturbed weights). Per epoch it logs
the robust-shortcut statistics (AV SD, top/bottom 10% means, % AV >= 1, % AV <= 0; Eq. 5, Table 1),
how many examples lost or gained robustness since the previous tracked epoch, and the disordered-
robustness fractions of the margin along each example's own PGD direction (Eq. 6). Per-example arrays
go to <run dir>/instance_tracking.npz after every tracked epoch, so a resumed run reloads them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from robust_train.addons.iseat_analysis import av_statistics, margin_along_direction
from robust_train.attacks import PGD, ThreatModel, attack_mode
from robust_train.data import DataBundle
from robust_train.data import to_float as images_to_float
from robust_train.errors import ConfigError
from robust_train.io import atomic_write
from robust_train.schema import (
    Flag,
    NonNegativeInt,
    PositiveInt,
    PositiveNumber,
    Schema,
    Step,
    resolve_step,
    validate_node,
)

# Offset of the subset / attack-start generator's seed from the run seed (its own stream: tracking on
# or off leaves the training RNG streams unchanged).
TRACKING_SEED_OFFSET = 2_000_029
# Per-example arrays saved each tracked epoch, shape (epochs, n_examples).
PER_EXAMPLE = ("clean_loss", "adv_loss", "clean_correct", "robust_correct")


class TrackingAttackConfig(Schema):
    """`trainer.instance_tracking.attack`: PGD10, zero start, step eps/4, eval-mode BN
    (docs/methods/iseat.md#analysis); PGD50 for Table 1."""

    steps: PositiveInt = 10
    step_size: Step | None = None  # null: eps/4
    random_start: Literal["none", "uniform", "normal"] = "none"


class TrackingMarginConfig(Schema):
    """`trainer.instance_tracking.margin`: disordered robustness, the margin along each example's PGD
    direction (Eq. 6) for the first `n_examples` tracked examples (0 disables)."""

    n_examples: NonNegativeInt = 100
    mu_max: PositiveNumber = 50.0
    grid_step: PositiveNumber = 0.1

    def check(self, path: str) -> list[str]:
        problems = super().check(path)
        if self.grid_step > self.mu_max:
            problems.append(
                f"{path} needs 0 < grid_step <= mu_max, got grid_step={self.grid_step}, mu_max={self.mu_max}"
            )
        return problems


class InstanceTrackingConfig(Schema):
    """`trainer.instance_tracking` (off by default): which examples are tracked, how often, how attacked."""

    enabled: Flag = False
    every: PositiveInt = 1  # track every N epochs (and the last)
    split: Literal["train", "val"] = "train"  # train: un-augmented training images, as ISEAT
    n_examples: PositiveInt | None = 500  # a seeded random subset; null: the whole split
    batch_size: PositiveInt = 256
    attack: TrackingAttackConfig = TrackingAttackConfig()
    margin: TrackingMarginConfig = TrackingMarginConfig()


def robustness_transitions(robust: np.ndarray) -> dict[str, np.ndarray]:
    """Per tracked epoch (rows of the (E, N) boolean matrix `robust`), in % of the N examples:

    robust_acc: robust now; robust_lost_pct: robust at the previous tracked epoch and not now;
    robust_gained_pct: the reverse; ever_lost_pct: examples that have lost robustness at least once up
    to this epoch (forgetting events, cumulative). The first epoch has no previous one: lost/gained 0.
    """
    r = np.asarray(robust, dtype=bool)
    if r.ndim != 2:
        raise ValueError(f"robust must be (epochs, examples), got shape {r.shape}")
    n = max(1, r.shape[1])
    prev = np.concatenate([r[:1], r[:-1]], axis=0)
    lost = prev & ~r
    gained = ~prev & r
    ever_lost = np.logical_or.accumulate(lost, axis=0) if r.shape[0] else lost
    return {
        "robust_acc": 100.0 * r.sum(1) / n,
        "robust_lost_pct": 100.0 * lost.sum(1) / n,
        "robust_gained_pct": 100.0 * gained.sum(1) / n,
        "ever_lost_pct": 100.0 * ever_lost.sum(1) / n,
    }


def margin_stats(mu: np.ndarray, budget: np.ndarray, mu_max: float) -> dict[str, float]:
    """Disordered robustness (ISEAT Eq. 6, Fig. 1b) from margins `mu` along each example's PGD direction.

    `budget` is each example's in-budget distance along that direction (the L2 length of its PGD
    perturbation; docs/methods/iseat.md#analysis for CIFAR-10 at 8/255). Returns % flipping within the budget,
    %
    surviving twice the budget and % never flipping up to mu_max; examples with no direction (zero
    perturbation, NaN) are left out.
    """
    mu, budget = np.asarray(mu, dtype=float), np.asarray(budget, dtype=float)
    ok = np.isfinite(mu) & np.isfinite(budget)
    if not ok.any():
        return {"margin_in_budget_pct": math.nan, "margin_2x_pct": math.nan, "margin_never_pct": math.nan}
    mu, budget = mu[ok], budget[ok]
    return {
        "margin_in_budget_pct": 100.0 * float(np.mean(mu <= budget)),
        "margin_2x_pct": 100.0 * float(np.mean(mu >= 2 * budget)),
        "margin_never_pct": 100.0 * float(np.mean(mu >= mu_max)),
    }


def _av_stats(av: np.ndarray) -> dict[str, float]:
    """ISEAT Table 1's columns (Eq. 5) under this callback's metric names."""
    st = av_statistics(torch.from_numpy(np.asarray(av, dtype=np.float64)))
    return {"av_sd": st["sd"], "av_top10": st["top"], "av_bottom10": st["bottom"],
            "av_high_pct": st["high_pct"], "av_low_pct": st["low_pct"]}  # fmt: skip


class InstanceTracking:
    """Instance-wise robustness of a fixed example subset across epochs (docs/methods/iseat.md#analysis)."""

    file_name = "instance_tracking.npz"
    plot_name = "instance_tracking.png"

    def __init__(
        self, node: Mapping[str, Any], run_dir: Path, data: DataBundle, threat: ThreatModel, seed: int
    ):
        cfg = validate_node(InstanceTrackingConfig, node, "trainer.instance_tracking")
        self.run_dir = Path(run_dir)
        self.every = cfg.every
        self.split = cfg.split
        self.batch_size = cfg.batch_size
        x_all, y_all = (data.train_x, data.train_y) if self.split == "train" else (data.val_x, data.val_y)
        if x_all.shape[0] == 0:
            raise ConfigError(
                f"trainer.instance_tracking.split={self.split} is empty; choose the other split"
            )
        n = cfg.n_examples or x_all.shape[0]
        gen = torch.Generator().manual_seed(int(seed) + TRACKING_SEED_OFFSET)
        # A seeded random subset (datasets may be stored sorted by class), kept in index order.
        self.indices = torch.randperm(x_all.shape[0], generator=gen)[: min(n, x_all.shape[0])].sort().values
        idx = self.indices.to(x_all.device)
        self.x, self.y = x_all[idx], y_all[idx]  # un-augmented (docs/methods/iseat.md#analysis)
        att = cfg.attack
        # Default PGD10, zero start, alpha = eps/4, eval-mode BN: deterministic
        # (docs/methods/iseat.md#analysis).
        step_size = (
            threat.eps / 4
            if att.step_size is None
            else resolve_step(att.step_size, threat.eps, "trainer.instance_tracking.attack.step_size")
        )
        attack_gen = torch.Generator(device=x_all.device)
        attack_gen.manual_seed(int(seed) + TRACKING_SEED_OFFSET)
        self.attack = PGD(threat, steps=att.steps, step_size=step_size, random_start=att.random_start,
                          bn_mode="eval", generator=attack_gen)  # fmt: skip
        self.margin_n = min(cfg.margin.n_examples, self.x.shape[0])
        self.mu_max = cfg.margin.mu_max
        self.grid_step = cfg.margin.grid_step
        self.epochs: list[int] = []
        self.arrays: dict[str, list[np.ndarray]] = {k: [] for k in (*PER_EXAMPLE, "margin", "margin_budget")}
        self._loaded = False

    @classmethod
    def from_config(
        cls, cfg: Any, run_dir: Path, data: DataBundle, threat: ThreatModel
    ) -> InstanceTracking | None:
        """The callback when `trainer.instance_tracking.enabled` is true, else None."""
        node = cfg.trainer.get("instance_tracking")
        if not node or not node.get("enabled", False):
            return None
        return cls(node, run_dir, data, threat, int(cfg.seed))

    @property
    def path(self) -> Path:
        return self.run_dir / self.file_name

    # ------------------------------------------------------------------ measurement
    def measure(self, model: nn.Module) -> dict[str, np.ndarray]:
        """Per-example clean/PGD loss and correctness (and margins for the first margin_n) under `model`."""
        out: dict[str, list[np.ndarray]] = {k: [] for k in self.arrays}
        left = self.margin_n
        for i in range(0, self.x.shape[0], self.batch_size):
            x = images_to_float(self.x[i : i + self.batch_size])
            y = self.y[i : i + self.batch_size]
            x_adv = self.attack(model, x, y)
            with attack_mode(model, "eval"), torch.no_grad():
                lc, la = model(x), model(x_adv)
            out["clean_loss"].append(F.cross_entropy(lc, y, reduction="none").double().cpu().numpy())
            out["adv_loss"].append(F.cross_entropy(la, y, reduction="none").double().cpu().numpy())
            out["clean_correct"].append((lc.argmax(1) == y).cpu().numpy())
            out["robust_correct"].append((la.argmax(1) == y).cpu().numpy())
            if left > 0:
                k = min(left, x.shape[0])
                delta = (x_adv[:k] - x[:k]).flatten(1)
                norm = delta.norm(dim=1)
                mu = margin_along_direction(model, x[:k], (x_adv[:k] - x[:k]), self.mu_max, self.grid_step)
                # A zero perturbation has no direction: its margin is undefined, not mu_max.
                mu = torch.where(norm > 0, mu.double(), torch.full_like(mu, math.nan, dtype=torch.float64))
                out["margin"].append(mu.cpu().numpy())
                out["margin_budget"].append(norm.double().cpu().numpy())
                left -= k
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}

    def stats(self) -> dict[str, float]:
        """The summary metrics of the latest tracked epoch (keys without the `instance/` prefix)."""
        s = _av_stats(self.arrays["adv_loss"][-1] - self.arrays["clean_loss"][-1])
        s["clean_acc"] = 100.0 * float(np.mean(self.arrays["clean_correct"][-1]))
        trans = robustness_transitions(np.stack(self.arrays["robust_correct"]))
        s.update({k: float(v[-1]) for k, v in trans.items()})
        if self.margin_n:
            s.update(margin_stats(self.arrays["margin"][-1], self.arrays["margin_budget"][-1], self.mu_max))
        return s

    # ------------------------------------------------------------------ trainer hook
    def on_epoch_end(self, trainer: Any, epoch: int) -> dict[str, float]:
        """Called with the number of completed epochs; returns `instance/*` metrics for the epoch record."""
        if not self._loaded:
            self.load(before=epoch)
        if epoch % self.every != 0 and epoch != int(getattr(trainer, "epochs", epoch)):
            return {}
        values = self.measure(trainer.model)
        self.epochs.append(int(epoch))
        for k, v in values.items():
            self.arrays[k].append(v)
        self.save()
        return {f"instance/{k}": v for k, v in self.stats().items()}

    # ------------------------------------------------------------------ persistence
    def save(self) -> None:
        data: dict[str, Any] = {"epochs": np.asarray(self.epochs, dtype=np.int64),
                                "indices": self.indices.numpy(), "split": np.asarray(self.split)}  # fmt: skip
        for k, rows in self.arrays.items():
            if rows:
                data[k] = np.stack(rows)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **data)

        atomic_write(self.path, write)

    def load(self, before: int) -> None:
        """Reload an earlier run's file, keeping epochs < `before` (later rows belong to an epoch whose
        checkpoint was never written, and are measured again)."""
        self._loaded = True
        if not self.path.is_file():
            return
        with np.load(self.path) as f:
            same = np.array_equal(f["indices"], self.indices.numpy()) and str(f["split"]) == self.split
            if not same:
                warnings.warn(
                    f"{self.path} tracks other examples than this config; starting a new record",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            keep = f["epochs"] < before
            self.epochs = [int(e) for e in f["epochs"][keep]]
            for k in self.arrays:
                self.arrays[k] = list(f[k][keep]) if k in f.files else []

    def finish(self, tracker: Any = None) -> Path | None:
        """Draw the across-epoch plot (and log it as a W&B image); None before any tracked epoch."""
        from robust_train.evaluation.plots import plot_instance_tracking

        if not self._loaded:
            self.load(before=10**9)
        if not self.epochs:
            return None
        per_epoch: dict[str, list[float]] = {}
        robust = np.stack(self.arrays["robust_correct"])
        for k, v in robustness_transitions(robust).items():
            per_epoch[k] = [float(a) for a in v]
        for e in range(len(self.epochs)):
            for key, value in _av_stats(self.arrays["adv_loss"][e] - self.arrays["clean_loss"][e]).items():
                per_epoch.setdefault(key, []).append(value)
            if self.margin_n and e < len(self.arrays["margin"]):
                m = margin_stats(self.arrays["margin"][e], self.arrays["margin_budget"][e], self.mu_max)
                per_epoch.setdefault("margin_never_pct", []).append(m["margin_never_pct"])
        path = plot_instance_tracking(self.run_dir / self.plot_name, self.epochs, per_epoch, robust)
        if tracker is not None and hasattr(tracker, "log_images"):
            tracker.log_images({"instance/tracking": path})
        return path
