"""MART (Wang et al. 2020), docs/methods/mart.md.

The training attack ascends CE (BN in eval mode, 0.001*N(0,I) start); the outer loss is the boosted
CE on x' plus beta * the (1 - p_y(x))-weighted KL(p(x) || q(x')).
"""

from __future__ import annotations

from robust_train.config import to_float
from robust_train.defenses.base import Defense, StepLoss
from robust_train.defenses.losses import mart_loss
from robust_train.training.forwards import StepForwards


class MART(Defense):
    name = "mart"
    train_branch = "adv"
    default_random_start = "normal"

    def __init__(self, cfg, threat) -> None:
        super().__init__(cfg, threat)
        self.beta = to_float(cfg.get("beta", 6.0), "defense.beta")

    def outer_loss(self, out: StepForwards) -> StepLoss:
        clean, adv = out.logits("clean"), out.logits("adv")
        loss, bce, kl = mart_loss(clean, adv, out.y, self.beta)
        return StepLoss(
            loss=loss, logits=adv, terms={"bce": bce.detach(), "kl_weighted": kl.detach()}, label_term=bce
        )
