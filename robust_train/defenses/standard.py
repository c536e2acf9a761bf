"""Standard (clean) training: CE(f(x), y)."""

from __future__ import annotations

from typing import ClassVar, Literal

from robust_train.defenses.awp import AWPConfig
from robust_train.defenses.base import Defense, DefenseConfig
from robust_train.registry import DEFENSES
from robust_train.step_types import LABEL, StepForwards, StepLoss, Term


class StandardConfig(DefenseConfig):
    """`defense=standard`: no training attack, no weight perturbation."""

    adversarial: ClassVar[bool] = False
    smooths_labels: ClassVar[bool] = True

    name: Literal["standard"] = "standard"
    attack: dict | None = None
    awp: AWPConfig | None = None


@DEFENSES.register("standard", schema=StandardConfig)
class Standard(Defense):
    name = "standard"
    train_branch = "clean"
    label_branch = "clean"
    outer_branches = ("clean",)

    def outer_loss(self, out: StepForwards) -> StepLoss:
        logits = out.logits("clean")
        ce = self.label_ce(logits, out.y)
        return StepLoss(logits=logits, terms={"ce": Term(ce, role=LABEL, branch="clean", fn=self.label_ce)})
