"""The base-defense contract of the training-step pipeline (docs/extending.md).

A base defense supplies the two things every step needs: the objective its training attack ascends
(`inner_loss`) and the loss the optimizer minimizes (`outer_loss`), returned as named, weighted terms
(`StepLoss`) with the supervised one marked `label`, so add-ons can reweight or re-evaluate a term
without knowing which defense they run on. Its weight perturbations (AWP) join the step's
weight-perturbation stage through `weight_perturbations()`. Add-ons contribute to the same stages
through their own hooks; the pipeline in `robust_train.training.step` calls both.

Each defense has a config schema (a `DefenseConfig` subclass) registered with it:

    @DEFENSES.register("mine", schema=MineConfig)
    class Mine(Defense): ...
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from robust_train.attacks import Attack, Objective, ThreatModel, build_attack
from robust_train.defenses.awp import AWP, AWPConfig
from robust_train.defenses.losses import smoothed_cross_entropy
from robust_train.errors import ConfigError
from robust_train.registry import ATTACKS, DEFENSES
from robust_train.schema import Number, Schema, check_node, validate_node
from robust_train.step_types import CleanReference, StepForwards, StepLoss, TermFn


class DefenseConfig(Schema):
    """The `defense` node: fields every base defense has. Subclasses add the method's own keys.

    `attack` is the training attack's node (validated by the attack's own schema; the method's default
    is the subclass's default), `None` for a defense that trains on clean inputs.
    """

    # Whether the method crafts a training batch: True requires `attack`, False refuses it.
    adversarial: ClassVar[bool] = True
    # Whether the method applies `label_smoothing` to its supervised term (ours do); a defense that does
    # not refuses a value > 0 rather than ignore it.
    smooths_labels: ClassVar[bool] = False

    name: str
    attack: dict[str, Any] | None = None
    awp: AWPConfig | None = None
    # Label smoothing of the supervised (role `label`) term only: CE(f(x'), y) of PGD-AT, CE(f(x), y) of
    # TRADES and standard training, the CE part of MART's boosted CE. Never the attack's objective nor a
    # KL term. 0: hard labels (DM-Improves-AT uses 0.1 with TRADES).
    label_smoothing: Annotated[Number, Field(ge=0, lt=1)] = 0.0

    @model_validator(mode="after")
    def _attack_matches_the_method(self) -> DefenseConfig:
        problems = []
        if self.adversarial and self.attack is None:
            problems.append(f"defense={self.name} needs a training attack: defense.attack is null")
        if not self.adversarial and self.attack is not None:
            problems.append(f"defense={self.name} trains on clean inputs; defense.attack must be null")
        if self.attack is not None and self.attack.get("name") == "autoattack":
            problems.append("defense.attack cannot be autoattack: it is an evaluation-only attack")
        if not self.adversarial and self.awp is not None and self.awp.enabled:
            allowed = ", ".join(adversarial_defenses())
            problems.append(f"defense.awp.enabled=true needs an adversarial defense ({allowed})")
        if self.label_smoothing > 0 and not self.smooths_labels:
            problems.append(
                f"defense.label_smoothing={self.label_smoothing}: defense={self.name} does not apply label "
                "smoothing to its supervised term; leave it at 0"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


def pgd_training_attack(random_start: str, bn_mode: str) -> Any:
    """The default training attack of a PGD-based method: 10 steps of eps/4 (the YAML group file ties
    the step to `threat.step`)."""
    node = {"name": "pgd", "steps": 10, "step": "eps/4", "restarts": 1, "random_start": random_start,
            "bn_mode": bn_mode}  # fmt: skip
    return Field(default_factory=lambda: dict(node))


def adversarial_defenses() -> list[str]:
    """Registered defenses that train on an adversarial batch, in registration order."""
    return [e.name for e in DEFENSES if e.schema is not None and e.schema.adversarial]


def defense_config(cfg: Any) -> DefenseConfig:
    """The `defense` node validated by the schema of the defense it names (ConfigError otherwise)."""
    if isinstance(cfg, DefenseConfig):
        return cfg
    name = cfg.get("name") if isinstance(cfg, Mapping) or hasattr(cfg, "get") else None
    entry = DEFENSES.get(name, key="defense.name")
    return validate_node(entry.schema, cfg, "defense")


def check_defense(cfg: Any) -> tuple[DefenseConfig | None, list[str]]:
    """(validated node, []) or (None, every problem found) for a `defense` node.

    The training attack's node is the attack schemas' to check (run validation does it with the run's
    threat model: `robust_train.attacks.check_attack`); here it is only a mapping with the method's
    default, and the rules tying it to the defense (needed, refused, not AutoAttack) apply.
    """
    name = cfg.get("name") if cfg is not None and hasattr(cfg, "get") else None
    try:
        entry = DEFENSES.get(name, key="defense.name")
    except ConfigError as err:
        return None, [str(err)]
    return check_node(entry.schema, cfg, "defense")


def _has_start(attack: Mapping[str, Any]) -> bool:
    """Whether the attack a node names takes a `random_start` (a plugin attack may not)."""
    try:
        schema = ATTACKS.get(attack.get("name"), key="defense.attack.name").schema
    except ConfigError:
        return False  # the attack's builder reports the unknown name
    return schema is not None and "random_start" in schema.model_fields


class Defense(ABC):
    """A base training method. Subclasses override `outer_loss` and, when they attack, `inner_loss`."""

    name = "defense"
    # The branch the method trains on ('adv' for adversarial training); the training accuracy is read
    # from it and add-ons that need an adversarial batch require 'adv'.
    train_branch = "clean"
    # The branch the supervised (label) term reads, and every branch the outer loss reads: add-ons that
    # change a branch's forward (LAD) decide from these whether that forward feeds only the label term.
    label_branch = "clean"
    outer_branches: tuple[str, ...] = ("clean",)
    # The training attack's start when its node names none: the method's own (TRADES/MART: 0.001*N).
    default_random_start = "uniform"

    def __init__(self, cfg: Any, threat: ThreatModel) -> None:
        self.cfg = cfg = defense_config(cfg)
        self.threat = threat
        attack_cfg = cfg.attack
        if attack_cfg is not None and attack_cfg.get("random_start") is None and _has_start(attack_cfg):
            attack_cfg = {**attack_cfg, "random_start": self.default_random_start}
        self.attack: Attack | None = (
            build_attack(attack_cfg, threat, key="defense.attack") if attack_cfg is not None else None
        )
        # The optional weight-perturbation mechanism (AT-AWP, TRADES-AWP, MART-AWP).
        self.awp: AWP | None = AWP.from_config(cfg.awp)
        self.epoch = 0
        self.label_smoothing = float(cfg.label_smoothing)
        # The supervised CE with the configured smoothing: the label term's value and its `fn`, so an
        # add-on that re-evaluates the term on other logits (LAD) smooths the same way.
        self.label_ce: TermFn = smoothed_cross_entropy(self.label_smoothing)

    def inner_loss(
        self, logits_adv: torch.Tensor, y: torch.Tensor, clean: CleanReference, model: nn.Module
    ) -> torch.Tensor:
        """The per-example loss the training attack ascends, from the logits of x_adv; CE by default.

        `clean` gives the clean batch's logits (no gradient, attack mode) for losses that need them.
        """
        return F.cross_entropy(logits_adv, y, reduction="none")

    def inner_objective(self, x: torch.Tensor, y: torch.Tensor) -> Objective:
        """`inner_loss` as an attack objective `(model, x_adv) -> (B,)` (for using the defense alone)."""
        clean = CleanReference(x)

        def objective(model: nn.Module, x_adv: torch.Tensor) -> torch.Tensor:
            return self.inner_loss(model(x_adv), y, clean, model)

        return objective

    def craft(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
    ) -> torch.Tensor | None:
        """The adversarial batch, or None for a defense that trains on clean inputs only."""
        if self.attack is None:
            return None
        return self.attack(model, x, y, objective).detach()

    @abstractmethod
    def outer_loss(self, out: StepForwards) -> StepLoss:
        """The loss minimized in this step, as named terms (the supervised one with role `label`)."""

    def weight_perturbations(self) -> list[Any]:
        """Contributors to the step's weight-perturbation stage, entered before the add-ons' (AWP)."""
        return [self.awp] if self.awp is not None else []

    def on_epoch_start(self, epoch: int) -> None:
        """Epoch-dependent switches: the AWP warm-up."""
        self.epoch = epoch
        if self.awp is not None:
            self.awp.on_epoch_start(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Resumable state (the AWP schedule position)."""
        return {"epoch": self.epoch, "awp": self.awp.state_dict() if self.awp is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        if self.awp is not None and state.get("awp"):
            self.awp.load_state_dict(state["awp"])
