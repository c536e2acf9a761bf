"""Standard (clean) training: CE(f(x), y)."""

from __future__ import annotations

import torch.nn.functional as F

from robust_train.defenses.base import Defense, StepLoss
from robust_train.training.forwards import StepForwards


class Standard(Defense):
    name = "standard"
    train_branch = "clean"

    def outer_loss(self, out: StepForwards) -> StepLoss:
        logits = out.logits("clean")
        ce = F.cross_entropy(logits, out.y)
        return StepLoss(loss=ce, logits=logits, terms={"ce": ce.detach()}, label_term=ce)
