"""The add-on contract of the training-step pipeline (docs/extending.md).

An add-on implements only the stages it touches; every hook defaults to doing nothing. The step calls
the hooks of the selected add-ons in this fixed order, each stage in the order the add-ons are listed
in the config (`addons=[sat,lad]`: SAT's hook, then LAD's):

1. `on_epoch_start`       once per epoch, before its first step (schedules, warm-ups)
2. `attack_context`       entered around crafting x_adv (e.g. RWT's weight noise during the attack)
3. `inner_objective`      per-example terms added to the base defense's inner loss, from the same
                          forward of x_adv (logits and the tapped `required_layers`) and the clean
                          reference computed once per batch in the attack's mode
4. `weight_perturbation`  entered around the outer forward/backward/optimizer step; restores on exit.
                          One contract for every contributor: the base defense's own perturbations
                          (`Defense.weight_perturbations()`, i.e. AWP) are entered first, then the
                          add-ons'. `base_loss(m)` is the base outer loss evaluated with module `m`.
5. `forward_context`      entered around every shared forward of the step (`StepForwards`), with the
                          forwards object and the branch; `out.state` carries what this stage hands to
                          stage 6, `out.outer_step` tells the trained forwards from a perturbation
                          search's (AWP's proxy)
6. `outer_loss`           items added to the base loss, in order: a tensor is a new term; a
                          `Reweight(term, change)` changes the weight of one of the base's terms (by
                          name, or `label` for its supervised term) from w to w * (1 + change). The
                          base's `StepLoss` lists its terms with their weights, roles, branches and the
                          function that recomputes a term from other logits (LAD re-evaluates the
                          label term on its perturbed forward with it).

`required_layers` are tapped once per forward and shared by every term. `wrap_for_eval` lets an
add-on change how the trained model predicts at evaluation time (default: unchanged), and
`epoch_metrics` adds diagnostics to each epoch's record.

Config: each add-on has a schema (an `AddonConfig` subclass) registered with it,
`@ADDONS.register("mine", schema=MineConfig)`; the node `addons.<name>` is validated by it, and the
add-on receives the validated schema object. Cross-field rules are class declarations checked at
validation: `needs_adversarial` (or an explicit `supported_defenses`), `supports_awp`,
`conflicts_with`, and `check_config(cfg, run_cfg)` for rules that need the rest of the run config.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from pydantic import AfterValidator
from torch import nn

from robust_train.registry import ADDONS
from robust_train.schema import Flag, Schema, validate_node
from robust_train.step_types import CleanReference, Reweight, StepForwards, StepLoss

if TYPE_CHECKING:
    from robust_train.attacks import ThreatModel
    from robust_train.defenses.base import Defense


class AddonConfig(Schema):
    """The `addons.<name>` node: fields every add-on has. Subclasses add the method's own keys."""

    # false: the add-on is not built at all (its settings are kept).
    enabled: Flag = True


def divergence_guard(limit: float) -> AfterValidator:
    """A field validator refusing |value| > limit (every entry of a list): strengths past the papers'
    largest values by orders of magnitude drown the base loss and training diverges."""

    def check(value: Any) -> Any:
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if isinstance(v, int | float) and math.isfinite(v) and abs(v) > limit:
                raise ValueError(
                    f"exceeds the divergence guard: allowed |value| <= {limit:g} (a larger strength "
                    "drowns the base loss and training diverges)"
                )
        return value

    return AfterValidator(check)


@dataclass
class AddonContext:
    """What an add-on may read when it is built."""

    cfg: Any  # the whole run config (trainer schedule, dataset, ...)
    model: nn.Module
    defense: Defense
    threat: ThreatModel
    num_classes: int
    seed: int


def addon_config(name: str, cfg: Any) -> Schema:
    """The `addons.<name>` node validated by the add-on's registered schema (ConfigError otherwise)."""
    if isinstance(cfg, Schema):
        return cfg
    return validate_node(ADDONS.get(name, key="addons").schema, cfg, f"addons.{name}")


class Addon:
    """Base class for add-on methods. Subclasses override only the hooks they need."""

    name = "addon"
    # Whether the add-on needs a base defense that trains on an adversarial batch (train_branch 'adv').
    needs_adversarial: bool = False
    # An explicit list of the base defenses it composes with; None: every registered defense that
    # meets `needs_adversarial` (plugin defenses included).
    supported_defenses: tuple[str, ...] | None = None
    # Whether it composes with the base defense's AWP (defense.awp.enabled=true).
    supports_awp: bool = True
    # Add-ons whose weight perturbation would fight this one's (refused together).
    conflicts_with: tuple[str, ...] = ()

    def __init__(self, cfg: Any, ctx: AddonContext) -> None:
        # Built from the validated schema; a plain mapping (tests, scripts) is validated here.
        self.cfg: Any = addon_config(self.name, cfg)
        self.ctx = ctx

    @classmethod
    def check_config(cls, cfg: Any, run_cfg: Any) -> list[str]:
        """Problems of this add-on's config in the context of the run (empty list: fine).

        Keys, types, ranges and rules within the node are the schema's; this hook is for rules that
        read the rest of the run config. `cfg` is the validated schema, or None when the node itself has
        problems (rules that read it are then skipped); `run_cfg` may be None when there is none.
        """
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
    ) -> Iterator[Any]:
        """Perturb weights for the outer step; restore after the optimizer step.

        The same hook as the base defense's AWP. `base_loss(m)` is the base defense's outer loss
        evaluated with module `m` (e.g. an AWP proxy).
        """
        yield

    def forward_context(self, out: StepForwards, branch: str) -> Any:
        """A context manager entered around the shared forward of `branch` ('clean' or 'adv') of `out`."""
        return nullcontext()

    def outer_loss(self, out: StepForwards, base: StepLoss) -> dict[str, torch.Tensor | Reweight]:
        """Named items for the loss: scalar terms with gradient, or `Reweight`s of the base's terms."""
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
