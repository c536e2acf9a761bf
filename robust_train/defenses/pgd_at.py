"""PGD adversarial training (Madry et al. 2018; Rice et al.'s recipe), docs/methods/pgd_at.md.

The training attack ascends per-example CE; the outer loss is CE on the adversarial batch only, with
the model in train mode (no clean term).
"""

from __future__ import annotations

import torch.nn.functional as F

from robust_train.defenses.base import Defense, StepLoss
from robust_train.training.forwards import StepForwards


class PGDAT(Defense):
    name = "pgd_at"
    train_branch = "adv"

    def outer_loss(self, out: StepForwards) -> StepLoss:
        logits = out.logits("adv")
        ce = F.cross_entropy(logits, out.y)
        return StepLoss(loss=ce, logits=logits, terms={"ce_adv": ce.detach()}, label_term=ce)
