"""The base-defense contract of the training-step pipeline (DESIGN.md §5).

A base defense supplies the two things every step needs: the objective its training attack ascends
(`inner_objective`) and the loss the optimizer minimizes (`outer_loss`). Add-ons contribute to the same
stages through their own hooks; the pipeline in `robust_train.training.step` calls both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks import Attack, Objective, ThreatModel, build_attack
from robust_train.defenses.awp import AWP
from robust_train.training.forwards import CleanReference, StepForwards


@dataclass
class StepLoss:
    """A step's loss, its named terms (detached, for logging) and the logits its accuracy is read from."""

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    # The supervised label-fitting part of `loss` (loss = label_term + the base's regularizer), for
    # add-ons that rescale it (RWT's (1 - eta) factor, LAD's recombination).
    label_term: torch.Tensor | None = None


class Defense(ABC):
    """A base training method. Subclasses override `outer_loss` and, when they attack, `inner_objective`."""

    name = "defense"
    # Which branch the training accuracy is measured on ('adv' for adversarial training).
    train_branch = "clean"
    # The training attack's start when its node names none: the method's own (TRADES/MART: 0.001*N).
    default_random_start = "uniform"

    def __init__(self, cfg: Any, threat: ThreatModel) -> None:
        self.cfg = cfg
        self.threat = threat
        attack_cfg = cfg.get("attack") if cfg is not None else None
        if attack_cfg is not None and attack_cfg.get("random_start") is None:
            attack_cfg = {**dict(attack_cfg), "random_start": self.default_random_start}
        self.attack: Attack | None = (
            build_attack(attack_cfg, threat, key="defense.attack") if attack_cfg is not None else None
        )
        # The optional weight-perturbation mechanism (AT-AWP, TRADES-AWP, MART-AWP).
        self.awp: AWP | None = AWP.from_config(cfg.get("awp") if cfg is not None else None)
        self.epoch = 0

    def inner_loss(
        self, logits_adv: torch.Tensor, y: torch.Tensor, clean: CleanReference, model: nn.Module
    ) -> torch.Tensor:
        """The per-example loss the training attack ascends, from the logits of x_adv; CE by default.

        `clean` gives the clean batch's logits (no gradient, attack mode) for losses that need them.
        """
        return F.cross_entropy(logits_adv, y, reduction="none")

    def inner_objective(self, x: torch.Tensor, y: torch.Tensor) -> Objective:
        """`inner_loss` as an attack objective `(model, x_adv) -> (B,)` (for using the defense alone)."""
        clean = CleanReference(x)

        def objective(model: nn.Module, x_adv: torch.Tensor) -> torch.Tensor:
            return self.inner_loss(model(x_adv), y, clean, model)

        return objective

    def craft(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
    ) -> torch.Tensor | None:
        """The adversarial batch, or None for a defense that trains on clean inputs only."""
        if self.attack is None:
            return None
        return self.attack(model, x, y, objective).detach()

    @abstractmethod
    def outer_loss(self, out: StepForwards) -> StepLoss:
        """The loss minimized in this step."""

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch-dependent switches: the AWP warm-up."""
        self.epoch = epoch
        if self.awp is not None:
            self.awp.on_epoch_start(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (the AWP schedule position)."""
        return {"epoch": self.epoch, "awp": self.awp.state_dict() if self.awp is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        if self.awp is not None and state.get("awp"):
            self.awp.load_state_dict(state["awp"])
