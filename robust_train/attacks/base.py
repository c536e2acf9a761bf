"""The attack contract: `attack(model, x, y, objective=None) -> x_adv` (README "Layout").

An attack sets the BatchNorm mode it was configured with, freezes parameter gradients so that inner
loops differentiate with respect to the input only, and restores every module's mode and every
parameter's `requires_grad` flag on exit, even when it raises.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.errors import ConfigError
from robust_train.registry import ATTACKS
from robust_train.schema import NonNegativeNumber, Schema

if TYPE_CHECKING:
    from robust_train.attacks.threat import ThreatModel

BNMode = Literal["train", "eval"]  # the BatchNorm mode while an attack runs


class AttackConfig(Schema):
    """The keys every attack node may set; an attack's schema subclasses it and adds its own.

    `norm` and `eps` override the run's threat model for this attack only (an L2 PGD in an L-inf run).
    """

    name: str
    norm: Literal["linf", "l2"] | None = None
    eps: NonNegativeNumber | None = None

    def check_threat(self, norm: str | None, eps: float | None, path: str) -> list[str]:
        """Rules that need the run's threat model (`norm`, `eps`: the run's values, None where invalid).

        Problem lines name the full key under `path`; the default has none.
        """
        return []

    def options(self) -> dict[str, Any]:
        """The node's settings other than the selector and the threat override, as keyword arguments."""
        return {k: getattr(self, k) for k in type(self).model_fields if k not in ("name", "norm", "eps")}


# The loss an attack ascends: (model, x_candidate) -> per-example loss of shape (B,).
Objective = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def ce_objective(y: torch.Tensor) -> Objective:
    """Per-example cross-entropy of the model's logits against the true labels."""

    def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, reduction="none")

    return objective


@contextmanager
def attack_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Put the model in `bn_mode` ('train' or 'eval') with frozen parameters; restore both on exit."""
    if bn_mode not in ("train", "eval"):
        raise ConfigError(f"bn_mode={bn_mode!r} is not allowed; choose one of: train, eval")
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.train(bn_mode == "train")
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, flag in flags:
            p.requires_grad_(flag)


class Attack(ABC):
    """Base class. Subclasses implement `perturb`; `__call__` wraps it in `attack_mode`."""

    name: str = "attack"
    # The threat model the attack perturbs within; set by every attack that perturbs (not by Clean).
    threat: ThreatModel

    def __init__(self, bn_mode: str = "eval") -> None:
        self.bn_mode = bn_mode
        self.forward_passes = 0
        self.backward_passes = 0

    @classmethod
    def from_config(cls, cfg: AttackConfig, threat: ThreatModel, key: str) -> Attack:
        """The attack a validated node describes; `threat` already carries the node's eps/norm override.

        The default passes the node's own settings (`cfg.options()`) as keyword arguments after the
        threat model; an attack whose constructor differs overrides this.
        """
        return cls(threat, **cfg.options())  # type: ignore[arg-type]

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective | None = None
    ) -> torch.Tensor:
        with attack_mode(model, self.bn_mode):
            return self.perturb(model, x, y, objective or self.default_objective(y))

    def default_objective(self, y: torch.Tensor) -> Objective:
        """The loss ascended when the caller passes no objective (cross-entropy unless configured)."""
        return ce_objective(y)

    @abstractmethod
    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
    ) -> torch.Tensor:
        """Return x_adv; called with the model already in the attack's BN mode and frozen."""

    def describe(self) -> dict:
        """The settings that identify this attack in a results table."""
        return {"name": self.name, "bn_mode": self.bn_mode}


@ATTACKS.register("clean", schema=AttackConfig)
class Clean(Attack):
    """The identity 'attack': clean accuracy through the same evaluation loop."""

    name = "clean"

    @classmethod
    def from_config(cls, cfg: AttackConfig, threat: ThreatModel, key: str) -> Clean:
        return cls()

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective | None = None
    ) -> torch.Tensor:
        return x

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
    ) -> torch.Tensor:
        return x
