"""The add-on contract of the training-step pipeline (DESIGN.md §5).

An add-on implements only the stages it touches; every hook defaults to doing nothing. The step calls
the hooks of the selected add-ons in this fixed order, each stage in the order the add-ons are listed
in the config (`addons=[sat,lad]`: SAT's hook, then LAD's):

1. `on_epoch_start`       once per epoch, before its first step (schedules, warm-ups)
2. `attack_context`       entered around crafting x_adv (e.g. weight noise during the attack)
3. `inner_objective`      per-example terms added to the base defense's inner loss, from the same
                          forward of x_adv (logits and the tapped `required_layers`) and the clean
                          reference computed once per batch in the attack's mode
4. `weight_perturbation`  entered around the outer forward/backward/optimizer step; restores on exit
                          (the base defense's AWP, when enabled, is entered first)
5. `forward_context`      entered around every shared outer forward (e.g. LAD's perturbed states)
6. `outer_loss`           named terms added to the base loss; they see the base's `StepLoss`
                          (its `label_term` lets an add-on rescale the supervised part)

`required_layers` are tapped once per forward and shared by every term. `wrap_for_eval` lets an
add-on change how the trained model predicts at evaluation time (default: unchanged), and
`epoch_metrics` adds diagnostics to each epoch's record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from robust_train.training.forwards import CleanReference, StepForwards

if TYPE_CHECKING:
    from robust_train.attacks import ThreatModel
    from robust_train.defenses.base import Defense, StepLoss


@dataclass
class AddonContext:
    """What an add-on may read when it is built."""

    cfg: Any  # the whole run config (trainer schedule, dataset, ...)
    model: nn.Module
    defense: Defense
    threat: ThreatModel
    num_classes: int
    seed: int


class Addon:
    """Base class for add-on methods. Subclasses override only the hooks they need."""

    name = "addon"
    # Base defenses this add-on composes with; config validation refuses the others.
    supported_defenses: tuple[str, ...] = ("standard", "pgd_at", "trades", "mart")
    # Whether it composes with the base defense's AWP (defense.awp.enabled=true).
    supports_awp: bool = True
    # Add-ons whose weight perturbation would fight this one's (refused together).
    conflicts_with: tuple[str, ...] = ()

    def __init__(self, cfg: Any, ctx: AddonContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def check_config(cls, cfg: Any, run_cfg: Any) -> list[str]:
        """Problems with this add-on's config in the context of the run (empty list: fine)."""
        return []

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch-dependent switches."""

    @contextmanager
    def attack_context(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
        """Temporary changes while the training attack runs."""
        yield

    def required_layers(self) -> list[str]:
        """Feature layers this add-on reads (tapped in the attack's and the outer forwards)."""
        return []

    def inner_objective(
        self,
        x_adv: torch.Tensor,
        y: torch.Tensor,
        logits_adv: torch.Tensor,
        feats_adv: dict[str, torch.Tensor],
        clean: CleanReference,
        model: nn.Module,
        base_term: torch.Tensor,
    ) -> torch.Tensor | None:
        """An extra per-example term (B,) for the attack to ascend, or None. `base_term` is the base's."""
        return None

    @contextmanager
    def weight_perturbation(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor | None,
        base_loss: Callable[[nn.Module], torch.Tensor],
    ) -> Iterator[None]:
        """Perturb weights for the outer step; restore after the optimizer step.

        `base_loss(m)` is the base defense's outer loss evaluated with module `m` (e.g. an AWP proxy).
        """
        yield

    def forward_context(self, model: nn.Module, branch: str, x_in: torch.Tensor) -> Any:
        """A context manager entered around the shared outer forward of `branch` ('clean' or 'adv')."""
        return nullcontext()

    def outer_loss(self, out: StepForwards, base: StepLoss) -> dict[str, torch.Tensor]:
        """Named loss terms added to the base loss (each a scalar with gradient)."""
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Diagnostics logged with each epoch's record (read once per epoch, never inside a step)."""
        return {}

    def wrap_for_eval(self, model: nn.Module) -> nn.Module:
        """The model as the final evaluation should see it."""
        return model

    def state_dict(self) -> dict[str, Any]:
        """Resumable state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
