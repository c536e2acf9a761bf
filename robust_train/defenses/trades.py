"""TRADES (Zhang et al. 2019), docs/methods/trades.md.

Inner maximization: the attack ascends KL(p(x) || p(x')) with BN in eval mode, where the clean target
p(x) is computed once per batch in the attack's mode (it is constant there). Outer loss:
CE(f(x), y) + beta * KL(p(x) || p(x')) with batchmean reduction, gradients through both branches.
"""

from __future__ import annotations

import torch
from torch import nn

from robust_train.config import to_float
from robust_train.defenses.base import Defense, StepLoss
from robust_train.defenses.losses import kl_clean_adv, trades_loss
from robust_train.training.forwards import CleanReference, StepForwards


class TRADES(Defense):
    name = "trades"
    train_branch = "adv"
    default_random_start = "normal"

    def __init__(self, cfg, threat) -> None:
        super().__init__(cfg, threat)
        self.beta = to_float(cfg.get("beta", 6.0), "defense.beta")

    def inner_loss(
        self, logits_adv: torch.Tensor, y: torch.Tensor, clean: CleanReference, model: nn.Module
    ) -> torch.Tensor:
        # The clean target comes from the attack's own mode (BN eval), computed once per batch.
        return kl_clean_adv(logits_adv, clean.logits(model))

    def outer_loss(self, out: StepForwards) -> StepLoss:
        clean, adv = out.logits("clean"), out.logits("adv")
        loss, ce, kl = trades_loss(clean, adv, out.y, self.beta)
        return StepLoss(
            loss=loss, logits=adv, terms={"ce_clean": ce.detach(), "kl": kl.detach()}, label_term=ce
        )
