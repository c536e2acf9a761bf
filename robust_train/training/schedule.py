"""Learning-rate schedules as pure functions of (fractional) training time, so resume needs no state."""

from __future__ import annotations

import math
from typing import Any


def lr_at(cfg: Any, base_lr: float, epochs: int, epoch: int, batch: int, n_batches: int) -> float:
    """The learning rate for batch `batch` (0-based) of epoch `epoch` (0-based).

    piecewise: base * gamma^(milestones passed); cosine: half-cosine from base to 0 over `epochs`;
    constant. With `per_iteration` the schedule reads t = epoch + (batch+1)/n_batches (Rice et al.'s
    code, which drops the lr at the last iteration of epoch m-1); otherwise t = epoch. A linear warm-up
    over `warmup_epochs` multiplies any of them.

    Milestones are 0-indexed like `epoch`: m lowers the lr from the first batch of epoch m, the (m+1)-th
    epoch. Papers and the TRADES/MART/AWP/RWT scripts count epochs from 1 (`epoch >= 100` drops at the
    100th epoch), so their drop at epoch n is milestone n - 1.
    """
    frac = epoch + (batch + 1) / max(n_batches, 1)
    t = frac if cfg.get("per_iteration", False) else float(epoch)
    name = cfg.get("name", "piecewise")
    if name == "piecewise":
        passed = sum(1 for m in cfg.get("milestones") or [] if t >= float(m))
        lr = base_lr * float(cfg.get("gamma", 0.1)) ** passed
    elif name == "cosine":
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * min(t / max(epochs, 1), 1.0)))
    else:
        lr = base_lr
    warmup = float(cfg.get("warmup_epochs") or 0)
    if warmup > 0 and frac < warmup:
        lr *= frac / warmup
    return lr
