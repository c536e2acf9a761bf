"""Base defenses and their builder."""

from __future__ import annotations

from typing import Any

from robust_train.attacks import ThreatModel
from robust_train.config import DEFENSES
from robust_train.defenses.awp import AWP, perturbed_parameter_names
from robust_train.defenses.base import Defense, StepLoss
from robust_train.defenses.mart import MART
from robust_train.defenses.pgd_at import PGDAT
from robust_train.defenses.standard import Standard
from robust_train.defenses.trades import TRADES
from robust_train.errors import ConfigError

__all__ = [
    "AWP",
    "DEFENSE_CLASSES",
    "Defense",
    "MART",
    "PGDAT",
    "Standard",
    "StepLoss",
    "TRADES",
    "build_defense",
    "perturbed_parameter_names",
]

DEFENSE_CLASSES: dict[str, type[Defense]] = {
    "standard": Standard,
    "pgd_at": PGDAT,
    "trades": TRADES,
    "mart": MART,
}
assert set(DEFENSE_CLASSES) == set(DEFENSES)


def build_defense(cfg: Any, threat: ThreatModel) -> Defense:
    """The base defense named by `cfg.name`."""
    name = cfg.get("name")
    if name not in DEFENSE_CLASSES:
        raise ConfigError(
            f"defense.name={name!r} is not a known defense; allowed: {', '.join(DEFENSE_CLASSES)}"
        )
    return DEFENSE_CLASSES[name](cfg, threat)
