"""MART (Wang et al. 2020), docs/methods/mart.md.

The training attack ascends CE (BN in eval mode, 0.001*N(0,I) start); the outer loss is the boosted
CE on x' plus beta * the (1 - p_y(x))-weighted KL(p(x) || q(x')).
"""

from __future__ import annotations

from functools import partial
from typing import Annotated, Any, ClassVar, Literal, cast

import torch.nn.functional as F
from pydantic import Field

from robust_train.defenses.awp import AWPConfig
from robust_train.defenses.base import Defense, DefenseConfig, pgd_training_attack
from robust_train.defenses.losses import mart_boosted_ce, mart_weighted_kl
from robust_train.defenses.trades import MAX_BETA
from robust_train.registry import DEFENSES
from robust_train.schema import Number
from robust_train.step_types import LABEL, StepForwards, StepLoss, Term, TermFn


class MARTConfig(DefenseConfig):
    """`defense=mart`: beta 6 (WRN-34-10; 5 for ResNet-18), the official attack; MART-AWP with
    `awp.enabled` (TRADES-AWP's gamma 0.005 from epoch 10, docs/methods/awp.md#mart-awp)."""

    smooths_labels: ClassVar[bool] = True

    name: Literal["mart"] = "mart"
    beta: Annotated[Number, Field(ge=0, le=MAX_BETA)] = 6.0
    attack: dict[str, Any] | None = pgd_training_attack("normal", "eval")
    awp: AWPConfig | None = Field(default_factory=lambda: AWPConfig(gamma=0.005, warmup_epochs=9))


@DEFENSES.register("mart", schema=MARTConfig)
class MART(Defense):
    name = "mart"
    train_branch = "adv"
    label_branch = "adv"
    outer_branches = ("clean", "adv")
    default_random_start = "normal"

    def __init__(self, cfg: Any, threat: Any) -> None:
        super().__init__(cfg, threat)
        self.beta = float(cast(MARTConfig, self.cfg).beta)
        # The label term's recomputation carries the smoothing too (LAD re-evaluates it).
        self.bce_fn: TermFn = (
            mart_boosted_ce
            if self.label_smoothing == 0
            else partial(mart_boosted_ce, label_smoothing=self.label_smoothing)
        )

    def outer_loss(self, out: StepForwards) -> StepLoss:
        clean, adv = out.logits("clean"), out.logits("adv")
        # One softmax of x' serves both terms, as in the reference (and in `mart_loss`).
        q = F.softmax(adv, dim=1)
        bce = mart_boosted_ce(adv, out.y, q, self.label_smoothing)
        kl = mart_weighted_kl(clean, adv, out.y, q)
        terms = {
            "bce": Term(bce, role=LABEL, branch="adv", fn=self.bce_fn),
            "kl_weighted": Term(kl, weight=self.beta),
        }
        return StepLoss(logits=adv, terms=terms)
