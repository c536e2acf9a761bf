"""Base defenses, their config schemas and their builder.

Every defense registers itself with `robust_train.registry.DEFENSES` (name -> class and schema); a
plugin package registers its own the same way and is selected with `defense=<its name>`.
"""

from __future__ import annotations

from typing import Any

from robust_train.attacks import ThreatModel
from robust_train.defenses.awp import AWP, AWPConfig, offset_weights, perturbed_parameter_names
from robust_train.defenses.base import (
    Defense,
    DefenseConfig,
    adversarial_defenses,
    check_defense,
    defense_config,
)
from robust_train.registry import DEFENSES
from robust_train.step_types import StepLoss

# Registration order is the order in which messages list the defenses ("supported: pgd_at, trades,
# mart"): keep these imports in this order.
# isort: split
from robust_train.defenses.standard import Standard, StandardConfig

# isort: split
from robust_train.defenses.pgd_at import PGDAT, PGDATConfig

# isort: split
from robust_train.defenses.trades import TRADES, TRADESConfig

# isort: split
from robust_train.defenses.mart import MART, MARTConfig

__all__ = [
    "AWP",
    "AWPConfig",
    "Defense",
    "DefenseConfig",
    "MART",
    "MARTConfig",
    "PGDAT",
    "PGDATConfig",
    "Standard",
    "StandardConfig",
    "StepLoss",
    "TRADES",
    "TRADESConfig",
    "adversarial_defenses",
    "build_defense",
    "check_defense",
    "defense_config",
    "offset_weights",
    "perturbed_parameter_names",
]


def build_defense(cfg: Any, threat: ThreatModel) -> Defense:
    """The base defense named by `cfg.name` (a config node, a plain dict or a validated schema),
    looked up in the registry so that plugin defenses build the same way."""
    config = defense_config(cfg)
    return DEFENSES.get(config.name, key="defense.name").cls(config, threat)
