"""TRADES (Zhang et al. 2019), docs/methods/trades.md.

Inner maximization: the attack ascends KL(p(x) || p(x')) with BN in eval mode, where the clean target
p(x) is computed once per batch in the attack's mode (it is constant there). Outer loss:
CE(f(x), y) + beta * KL(p(x) || p(x')) with batchmean reduction, gradients through both branches.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, cast

import torch
from pydantic import Field
from torch import nn

from robust_train.defenses.awp import AWPConfig
from robust_train.defenses.base import Defense, DefenseConfig, pgd_training_attack
from robust_train.defenses.losses import kl_clean_adv, trades_loss
from robust_train.registry import DEFENSES
from robust_train.schema import Number
from robust_train.step_types import LABEL, CleanReference, StepForwards, StepLoss, Term

# The papers use beta 1-6; far larger values drown the supervised term.
MAX_BETA = 100.0


class TRADESConfig(DefenseConfig):
    """`defense=trades`: beta 6, the official attack (0.001*N(0,I) start, BN eval); TRADES-AWP with
    `awp.enabled` (gamma 0.005, off for the first 9 epochs)."""

    smooths_labels: ClassVar[bool] = True

    name: Literal["trades"] = "trades"
    beta: Annotated[Number, Field(ge=0, le=MAX_BETA)] = 6.0
    attack: dict[str, Any] | None = pgd_training_attack("normal", "eval")
    awp: AWPConfig | None = Field(default_factory=lambda: AWPConfig(gamma=0.005, warmup_epochs=9))


@DEFENSES.register("trades", schema=TRADESConfig)
class TRADES(Defense):
    name = "trades"
    train_branch = "adv"
    label_branch = "clean"
    outer_branches = ("clean", "adv")
    default_random_start = "normal"

    def __init__(self, cfg: Any, threat: Any) -> None:
        super().__init__(cfg, threat)
        self.beta = float(cast(TRADESConfig, self.cfg).beta)

    def inner_loss(
        self, logits_adv: torch.Tensor, y: torch.Tensor, clean: CleanReference, model: nn.Module
    ) -> torch.Tensor:
        # The clean target comes from the attack's own mode (BN eval), computed once per batch.
        return kl_clean_adv(logits_adv, clean.logits(model))

    def outer_loss(self, out: StepForwards) -> StepLoss:
        clean, adv = out.logits("clean"), out.logits("adv")
        _, ce, kl = trades_loss(clean, adv, out.y, self.beta, self.label_smoothing)
        terms = {
            "ce_clean": Term(ce, role=LABEL, branch="clean", fn=self.label_ce),
            "kl": Term(kl, weight=self.beta),
        }
        return StepLoss(logits=adv, terms=terms)
