"""The add-on contract of the training-step pipeline (DESIGN.md §5).

An add-on implements only the stages it touches; every hook defaults to doing nothing. The step calls
the hooks of the selected add-ons in this fixed order, each stage in the order the add-ons are listed
in the config:

1. `on_epoch_start`       once per epoch, before its first step (schedules, warm-ups)
2. `attack_context`       entered around crafting x_adv (e.g. weight noise during the attack)
3. `inner_objective`      per-example terms added to the base objective the attack ascends
4. `weight_perturbation`  entered around the outer forward/backward/optimizer step; restores on exit
                          (the base defense's AWP, when enabled, is entered first)
5. `required_layers`      feature layers the shared forwards must tap (read once per step)
6. `outer_loss`           terms added to the base loss
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from robust_train.training.forwards import StepForwards


class Addon:
    """Base class for add-on methods. Subclasses override only the hooks they need."""

    name = "addon"

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch-dependent switches."""

    @contextmanager
    def attack_context(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
        """Temporary changes while the training attack runs."""
        yield

    def inner_objective(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """An extra per-example term for the attack to ascend, or None."""
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

    def required_layers(self) -> list[str]:
        """Feature layers this add-on reads from the shared forwards."""
        return []

    def outer_loss(self, out: StepForwards) -> dict[str, torch.Tensor]:
        """Named loss terms added to the base loss (each a scalar with gradient)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Resumable state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` saved."""
