"""Attacks: threat models, the attack contract and the attack builders used by configs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from robust_train.attacks.autoattack import AutoAttack
from robust_train.attacks.base import Attack, Clean, Objective, attack_mode, ce_objective
from robust_train.attacks.pgd import FGSM, PGD
from robust_train.attacks.threat import ThreatModel
from robust_train.config import ATTACKS, to_float
from robust_train.errors import ConfigError

__all__ = [
    "Attack",
    "AutoAttack",
    "Clean",
    "FGSM",
    "Objective",
    "PGD",
    "ThreatModel",
    "attack_mode",
    "build_attack",
    "build_threat",
    "ce_objective",
]


def build_threat(node: Mapping[str, Any]) -> ThreatModel:
    """ThreatModel from a config node with `norm` and `eps` (eps may be written as 8/255)."""
    return ThreatModel(norm=str(node["norm"]), eps=to_float(node["eps"], "threat.eps"))


def build_attack(node: Mapping[str, Any], threat: ThreatModel, key: str = "attack") -> Attack:
    """An attack from its config node. Keys `eps` and `norm` in the node override the run's threat model."""
    name = node.get("name")
    if node.get("eps") is not None or node.get("norm") is not None:
        threat = ThreatModel(
            norm=str(node.get("norm") or threat.norm),
            eps=threat.eps if node.get("eps") is None else to_float(node["eps"], f"{key}.eps"),
        )
    bn_mode = str(node.get("bn_mode") or "eval")
    random_start = str(node.get("random_start") or "uniform")
    if name == "clean":
        return Clean()
    if name in ("pgd", "cw"):
        # CW is PGD on the Carlini-Wagner margin loss; one construction serves both names.
        attack = PGD(
            threat,
            steps=int(node.get("steps", 20 if name == "cw" else 10)),
            step_size=to_float(node["step"], f"{key}.step"),
            restarts=int(node.get("restarts") or 1),
            random_start=random_start,
            bn_mode=bn_mode,
            loss="cw" if name == "cw" else str(node.get("loss") or "ce"),
            kappa=to_float(node.get("kappa", 50.0), f"{key}.kappa"),
        )
        attack.name = name
        return attack
    if name == "autoattack":
        return AutoAttack(
            threat,
            version=str(node.get("version") or "standard"),
            seed=int(node.get("seed") or 0),
            batch_size=int(node.get("batch_size") or 500),
            state_path=node.get("state_path"),
        )
    if name == "fgsm":
        step = node.get("step")
        return FGSM(
            threat,
            step_size=None if step is None else to_float(step, f"{key}.step"),
            random_start=str(node.get("random_start") or "none"),
            bn_mode=bn_mode,
        )
    raise ConfigError(f"{key}.name={name!r} is not a known attack; allowed: {', '.join(ATTACKS)}")
