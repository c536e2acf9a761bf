"""Learning-rate schedules as pure functions of (fractional) training time, so resume needs no state."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import Field

from robust_train.schema import Flag, NonNegativeNumber, Number, Schema, validate_node


class ScheduleConfig(Schema):
    """`trainer.schedule` (docs/methods/README.md#training-recipe): lr x gamma at each milestone."""

    name: Literal["piecewise", "cosine", "constant"] = "piecewise"
    # 0-indexed epochs (piecewise): the lr is multiplied by gamma from the start of epoch m, i.e. the
    # (m+1)-th epoch. A paper's "n-th epoch" or a 1-indexed script's `epoch >= n` is milestone n - 1.
    milestones: list[NonNegativeNumber] = [100, 150]
    gamma: Annotated[Number, Field(gt=0, le=1)] = 0.1
    # true: evaluate the schedule at fractional epochs every step (Rice et al.)
    per_iteration: Flag = False
    # linear warm-up from 0 (cosine and piecewise)
    warmup_epochs: NonNegativeNumber = 0


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
    if not isinstance(cfg, ScheduleConfig):
        cfg = validate_node(ScheduleConfig, cfg, "trainer.schedule")
    frac = epoch + (batch + 1) / max(n_batches, 1)
    t = frac if cfg.per_iteration else float(epoch)
    if cfg.name == "piecewise":
        passed = sum(1 for m in cfg.milestones if t >= float(m))
        lr = base_lr * float(cfg.gamma) ** passed
    elif cfg.name == "cosine":
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * min(t / max(epochs, 1), 1.0)))
    else:
        lr = base_lr
    warmup = float(cfg.warmup_epochs)
    if warmup > 0 and frac < warmup:
        lr *= frac / warmup
    return lr
