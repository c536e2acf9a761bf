"""Per-example losses that attacks ascend, as objective factories `(y) -> Objective`."""

from __future__ import annotations

import torch
from torch import nn

from robust_train.attacks.base import Objective, ce_objective
from robust_train.errors import ConfigError


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{i != y} z_i per example (positive: correctly classified)."""
    true = logits.gather(1, y.unsqueeze(1)).squeeze(1)
    others = logits.scatter(1, y.unsqueeze(1), float("-inf"))
    return true - others.amax(dim=1)


def cw_objective(y: torch.Tensor, kappa: float = 50.0) -> Objective:
    """Carlini-Wagner margin loss -clamp(z_y - max_{i!=y} z_i + kappa, min=0) (the "CW" of PGD-CW evals)."""

    def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return -(margin(model(x), y) + kappa).clamp(min=0)

    return objective


LOSSES = ("ce", "cw")


def objective_for(loss: str, y: torch.Tensor, kappa: float = 50.0) -> Objective:
    """The named loss as an objective."""
    if loss == "ce":
        return ce_objective(y)
    if loss == "cw":
        return cw_objective(y, kappa)
    raise ConfigError(f"attack loss={loss!r} is not known; allowed: {', '.join(LOSSES)}")
