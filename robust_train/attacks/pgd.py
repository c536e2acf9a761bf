"""Projected gradient descent (Madry et al. 2018) and FGSM, for any threat model (docs/methods/pgd.md#pgd,
docs/methods/pgd.md#l2)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from robust_train.attacks.base import Attack, AttackConfig, BNMode, Objective
from robust_train.attacks.losses import objective_for
from robust_train.attacks.threat import ThreatModel, step_above_eps
from robust_train.registry import ATTACKS
from robust_train.schema import NonNegativeInt, Number, PositiveInt, Step, resolve_step

RandomStart = Literal["uniform", "normal", "none"]


class PGDConfig(AttackConfig):
    """`pgd`: docs/methods/pgd.md#pgd. `step` is absolute (2/255) or relative to eps (eps/4)."""

    steps: NonNegativeInt = 10
    step: Step
    restarts: PositiveInt = 1
    random_start: RandomStart = "uniform"
    bn_mode: BNMode = "eval"
    loss: Literal["ce", "cw"] = "ce"
    kappa: Number = 50.0  # the CW margin's confidence (loss=cw)

    def check_threat(self, norm: str | None, eps: float | None, path: str) -> list[str]:
        return step_above_eps(
            self.step, self.norm or norm, eps if self.eps is None else self.eps, f"{path}.step"
        )


class CWConfig(PGDConfig):
    """`cw`: PGD on the Carlini-Wagner margin loss (the "CW-k" column of robustness tables)."""

    steps: NonNegativeInt = 20
    loss: Literal["cw"] = "cw"


class FGSMConfig(AttackConfig):
    """`fgsm`: one signed-gradient step of size `step` (null: eps) from a zero or random start."""

    step: Step | None = None
    random_start: RandomStart = "none"
    bn_mode: BNMode = "eval"


@ATTACKS.register("pgd", schema=PGDConfig)
class PGD(Attack):
    """PGD with random start and restarts; keeps, per example, the restart with the highest objective.

    Step order (docs/methods/pgd.md#threat-model): ascent step, projection onto the ball, clip to the box. The
    random
    uniform start is clipped to the box before the first gradient; the `normal` start (TRADES/MART's
    0.001·N(0, I)) is not, as in their official code.
    """

    name = "pgd"

    def __init__(
        self,
        threat: ThreatModel,
        steps: int,
        step_size: float,
        restarts: int = 1,
        random_start: str = "uniform",
        bn_mode: str = "eval",
        generator: torch.Generator | None = None,
        loss: str = "ce",
        kappa: float = 50.0,
    ) -> None:
        super().__init__(bn_mode)
        objective_for(loss, torch.zeros(1, dtype=torch.long))  # fail fast on an unknown loss name
        self.loss = loss
        self.kappa = kappa
        self.threat = threat
        self.steps = int(steps)
        self.step_size = float(step_size)
        self.restarts = int(restarts)
        self.random_start = random_start
        self.generator = generator

    @classmethod
    def from_config(cls, cfg: PGDConfig, threat: ThreatModel, key: str) -> PGD:  # type: ignore[override]
        # CW is PGD on the Carlini-Wagner margin loss; one construction serves both names.
        attack = cls(
            threat,
            steps=cfg.steps,
            step_size=resolve_step(cfg.step, threat.eps, f"{key}.step"),
            restarts=cfg.restarts,
            random_start=cfg.random_start,
            bn_mode=cfg.bn_mode,
            loss=cfg.loss,
            kappa=cfg.kappa,
        )
        attack.name = cfg.name
        return attack

    def default_objective(self, y: torch.Tensor) -> Objective:
        """The configured loss (`ce`, or the Carlini-Wagner margin for `cw`) unless the caller passes one."""
        return objective_for(self.loss, y, self.kappa)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
    ) -> torch.Tensor:
        x = x.detach()
        best_delta = torch.zeros_like(x)
        best_loss = torch.full((x.shape[0],), -float("inf"), device=x.device)
        for _ in range(self.restarts):
            delta = self.threat.random_init(x, self.random_start, self.generator)
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = objective(model, x + delta)
                # Sum, not mean: per-example gradients do not depend on the batch size.
                (grad,) = torch.autograd.grad(loss.sum(), delta)
                self.forward_passes += 1
                self.backward_passes += 1
                delta = self.threat.step(delta.detach(), grad, self.step_size, x)
            delta = delta.detach()
            if self.restarts == 1:
                return (x + delta).clamp(0, 1)
            with torch.no_grad():
                loss = objective(model, x + delta).float()
            self.forward_passes += 1
            better = loss >= best_loss
            best_delta = torch.where(better.view(-1, *([1] * (x.dim() - 1))), delta, best_delta)
            best_loss = torch.maximum(best_loss, loss)
        return (x + best_delta).clamp(0, 1)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "norm": self.threat.norm,
            "eps": self.threat.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "restarts": self.restarts,
            "random_start": self.random_start,
            "bn_mode": self.bn_mode,
            "loss": self.loss,
        }


ATTACKS.register("cw", schema=CWConfig)(PGD)


@ATTACKS.register("fgsm", schema=FGSMConfig)
class FGSM(PGD):
    """One signed-gradient step of size eps (or `step_size`) from a zero or random start."""

    name = "fgsm"

    @classmethod
    def from_config(cls, cfg: FGSMConfig, threat: ThreatModel, key: str) -> FGSM:  # type: ignore[override]
        return cls(
            threat,
            step_size=None if cfg.step is None else resolve_step(cfg.step, threat.eps, f"{key}.step"),
            random_start=cfg.random_start,
            bn_mode=cfg.bn_mode,
        )

    def __init__(
        self,
        threat: ThreatModel,
        step_size: float | None = None,
        random_start: str = "none",
        bn_mode: str = "eval",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            threat,
            steps=1,
            step_size=threat.eps if step_size is None else step_size,
            restarts=1,
            random_start=random_start,
            bn_mode=bn_mode,
            generator=generator,
        )
