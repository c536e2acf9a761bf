"""PGD adversarial training (Madry et al. 2018; Rice et al.'s recipe), docs/methods/pgd_at.md.

The training attack ascends per-example CE; the outer loss is CE on the adversarial batch only, with
the model in train mode (no clean term).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from robust_train.defenses.awp import AWPConfig
from robust_train.defenses.base import Defense, DefenseConfig, pgd_training_attack
from robust_train.registry import DEFENSES
from robust_train.step_types import LABEL, StepForwards, StepLoss, Term


class PGDATConfig(DefenseConfig):
    """`defense=pgd_at`: Rice et al.'s attack (uniform start, BN in train mode while crafting); AT-AWP
    with `awp.enabled` (gamma 0.01 from epoch 0)."""

    smooths_labels: ClassVar[bool] = True

    name: Literal["pgd_at"] = "pgd_at"
    attack: dict[str, Any] | None = pgd_training_attack("uniform", "train")
    awp: AWPConfig | None = Field(default_factory=AWPConfig)


@DEFENSES.register("pgd_at", schema=PGDATConfig)
class PGDAT(Defense):
    name = "pgd_at"
    train_branch = "adv"
    label_branch = "adv"
    outer_branches = ("adv",)

    def outer_loss(self, out: StepForwards) -> StepLoss:
        logits = out.logits("adv")
        ce = self.label_ce(logits, out.y)
        return StepLoss(logits=logits, terms={"ce_adv": Term(ce, role=LABEL, branch="adv", fn=self.label_ce)})
