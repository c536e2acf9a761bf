"""One attack, one base defense and one add-on for robust-train, each a class with its config schema.

robust-train imports this module through the entry point in pyproject.toml; the decorators put the
classes in its registries, and the YAML files in `conf/` (found through Hydra's search path) make them
options on the command line. Each schema is the one place its defaults and ranges are written.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from robust_train.addons.base import Addon, AddonConfig
from robust_train.attacks.base import Attack, AttackConfig, BNMode, Objective
from robust_train.attacks.threat import ThreatModel
from robust_train.defenses.awp import AWPConfig
from robust_train.defenses.base import Defense, DefenseConfig, pgd_training_attack
from robust_train.registry import ADDONS, ATTACKS, DEFENSES
from robust_train.schema import Number, Step, resolve_step
from robust_train.step_types import LABEL, StepForwards, StepLoss, Term

# ----------------------------------------------------------------------------- attack


class RFGSMConfig(AttackConfig):
    """`rfgsm`: the random step `alpha` (absolute, or relative to eps: eps/2) and the BN mode."""

    name: Literal["rfgsm"] = "rfgsm"
    alpha: Step = "eps/2"
    bn_mode: BNMode = "eval"


@ATTACKS.register("rfgsm", schema=RFGSMConfig)
class RFGSM(Attack):
    """R+FGSM (Tramèr et al. 2018): x' = x + alpha * sign(N(0, I)), then one ascent step of eps - alpha
    from x', projected onto the eps-ball around x and clipped to the [0, 1] box."""

    name = "rfgsm"

    @classmethod
    def from_config(cls, cfg: RFGSMConfig, threat: ThreatModel, key: str) -> RFGSM:  # type: ignore[override]
        return cls(threat, alpha=resolve_step(cfg.alpha, threat.eps, f"{key}.alpha"), bn_mode=cfg.bn_mode)

    def __init__(self, threat: ThreatModel, alpha: float, bn_mode: str = "eval") -> None:
        super().__init__(bn_mode=bn_mode)
        self.threat = threat
        self.alpha = min(alpha, threat.eps)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
    ) -> torch.Tensor:
        x = x.detach()
        delta = self.threat.project(self.alpha * torch.randn_like(x).sign(), x)
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(model, x + delta).sum(), delta)
        self.forward_passes += 1
        self.backward_passes += 1
        delta = self.threat.step(delta.detach(), grad, self.threat.eps - self.alpha, x)
        return (x + delta).clamp(0, 1)

    def describe(self) -> dict:
        # norm, eps, steps and step_size are what the results table prints above the numbers.
        return {
            "name": self.name, "norm": self.threat.norm, "eps": self.threat.eps, "steps": 1,
            "alpha": self.alpha, "step_size": self.threat.eps - self.alpha, "bn_mode": self.bn_mode,
        }  # fmt: skip


# ----------------------------------------------------------------------------- base defense


class ALPConfig(DefenseConfig):
    """`defense=alp`: the pairing weight `lam` and a PGD-10 training attack (uniform start, BN eval)."""

    name: Literal["alp"] = "alp"
    lam: Number = Field(default=0.5, ge=0.0, le=100.0)
    attack: dict[str, Any] | None = pgd_training_attack("uniform", "eval")
    awp: AWPConfig | None = Field(default_factory=AWPConfig)


@DEFENSES.register("alp", schema=ALPConfig)
class ALP(Defense):
    """Adversarial logit pairing (Kannan et al. 2018): CE(f(x_adv), y) + lam * mean ||f(x_adv) - f(x)||^2.

    The CE is the supervised term (role `label`), so add-ons that reweight it work as with our defenses.
    """

    name = "alp"
    train_branch = "adv"
    label_branch = "adv"
    outer_branches = ("adv", "clean")

    def outer_loss(self, out: StepForwards) -> StepLoss:
        logits_adv = out.logits("adv")
        ce = F.cross_entropy(logits_adv, out.y)
        pairing = (logits_adv - out.logits("clean")).pow(2).sum(dim=1).mean()
        return StepLoss(
            logits=logits_adv,
            terms={
                "ce_adv": Term(ce, role=LABEL, branch="adv", fn=F.cross_entropy),
                "logit_pairing": Term(pairing, weight=float(self.cfg.lam)),
            },
        )


# ----------------------------------------------------------------------------- add-on


class LogitSqueezingConfig(AddonConfig):
    """`addons=[logit_squeezing]`: the weight `lam` of the squared-logit penalty."""

    lam: Number = Field(default=0.05, ge=0.0, le=100.0)


@ADDONS.register("logit_squeezing", schema=LogitSqueezingConfig)
class LogitSqueezing(Addon):
    """Logit squeezing (Kannan et al. 2018): + lam * mean ||f(x)||^2 on the batch the base trains on
    (the logits its accuracy is read from), logged as `logit_squeezing/penalty`."""

    name = "logit_squeezing"

    def outer_loss(self, out: StepForwards, base: StepLoss) -> dict[str, Any]:
        return {"penalty": float(self.cfg.lam) * base.logits.pow(2).sum(dim=1).mean()}
