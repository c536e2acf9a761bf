"""Attacks: threat models, the attack contract and the builder that turns config nodes into attacks.

Every attack is a registry entry (`robust_train.registry.ATTACKS`): a class and the schema of its config
node. `build_attack` picks the entry by the node's `name`, so an attack registered by a plugin package is
selected like ours (`eval.attacks.x.name: my_attack`, `defense.attack.name: my_attack`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from robust_train.attacks.autoattack import AutoAttack, AutoAttackConfig
from robust_train.attacks.base import Attack, AttackConfig, Clean, Objective, attack_mode, ce_objective
from robust_train.attacks.lafeat import LAFEAT, LAFEATConfig
from robust_train.attacks.pgd import FGSM, PGD, CWConfig, FGSMConfig, PGDConfig
from robust_train.attacks.ssa import SSAH, SSAConfig, SSAHConfig
from robust_train.attacks.threat import ThreatConfig, ThreatModel
from robust_train.errors import ConfigError
from robust_train.registry import ATTACKS
from robust_train.schema import check_node, raise_problems, validate_node

__all__ = [
    "Attack",
    "AttackConfig",
    "AutoAttack",
    "AutoAttackConfig",
    "CWConfig",
    "Clean",
    "FGSM",
    "FGSMConfig",
    "LAFEAT",
    "LAFEATConfig",
    "Objective",
    "PGD",
    "PGDConfig",
    "SSAConfig",
    "SSAH",
    "SSAHConfig",
    "ThreatConfig",
    "ThreatModel",
    "attack_mode",
    "build_attack",
    "build_threat",
    "ce_objective",
    "check_attack",
]


def build_threat(node: Any) -> ThreatModel:
    """ThreatModel from a `threat` node (`norm`, `eps`; eps may be written as 8/255)."""
    cfg = validate_node(ThreatConfig, node, "threat")
    return ThreatModel(norm=cfg.norm, eps=cfg.eps)


def check_attack(
    node: Any, path: str, norm: str | None = None, eps: float | None = None
) -> tuple[AttackConfig | None, list[str]]:
    """An attack node validated by the schema of the attack its `name` selects, or the problems found.

    `norm` and `eps` are the run's threat model (None where unknown or invalid), for the rules that
    depend on it (an absolute L-inf step above eps, L-inf-only attacks).
    """
    name = node.get("name") if isinstance(node, Mapping) or hasattr(node, "get") else None
    try:
        entry = ATTACKS.get(name, key=f"{path}.name")
    except ConfigError as err:  # an unknown name, with the closest ones
        return None, [str(err)]
    cfg, problems = check_node(entry.schema, node, path)
    if cfg is None:
        return None, problems
    problems = cfg.check_threat(norm, eps, path)
    return (None, problems) if problems else (cfg, [])


def build_attack(node: Any, threat: ThreatModel, key: str = "attack") -> Attack:
    """The attack a config node describes (a DictConfig, a dict or an AttackConfig).

    Keys `eps` and `norm` in the node override the run's threat model for this attack.
    """
    cfg, problems = check_attack(node, key, threat.norm, threat.eps)
    raise_problems(problems)
    assert cfg is not None
    if cfg.eps is not None or cfg.norm is not None:
        threat = ThreatModel(norm=cfg.norm or threat.norm, eps=threat.eps if cfg.eps is None else cfg.eps)
    return ATTACKS.get(cfg.name, key=f"{key}.name").cls.from_config(cfg, threat, key)
