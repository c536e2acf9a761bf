"""Attacks: threat models, the attack contract and the attack builders used by configs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from robust_train.attacks.autoattack import AutoAttack
from robust_train.attacks.base import Attack, Clean, Objective, attack_mode, ce_objective
from robust_train.attacks.lafeat import LAFEAT
from robust_train.attacks.pgd import FGSM, PGD
from robust_train.attacks.ssa import SSAH
from robust_train.attacks.threat import ThreatModel
from robust_train.config import ATTACKS, STEP_HELP, relative_step_factor, resolve_step, to_float
from robust_train.errors import ConfigError

__all__ = [
    "Attack",
    "AutoAttack",
    "Clean",
    "FGSM",
    "LAFEAT",
    "Objective",
    "PGD",
    "SSAH",
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
            step_size=_pgd_step(node, threat, key),
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
            step_size=None if step is None else resolve_step(step, threat.eps, f"{key}.step"),
            random_start=str(node.get("random_start") or "none"),
            bn_mode=bn_mode,
        )
    if name == "lafeat":
        return _build_lafeat(node, threat, key, bn_mode)
    if name in ("ssa", "ssah"):
        return SSAH(
            threat,
            iterations=_int(node, "iterations", 150),
            lr=to_float(node.get("lr", 1e-3), f"{key}.lr"),
            margin=to_float(node.get("margin", 0.2), f"{key}.margin"),
            alpha=to_float(node.get("alpha", 1.0), f"{key}.alpha"),
            lambda_lf=to_float(node.get("lambda_lf", 0.0 if name == "ssa" else 0.1), f"{key}.lambda_lf"),
            project=str(node.get("project") or "every_step"),
            batch_size=_int(node, "batch_size", 500),
            feature_input_of=str(node.get("feature_input_of") or "fc"),
            bn_mode=bn_mode,
            name=name,
        )
    raise ConfigError(f"{key}.name={name!r} is not a known attack; allowed: {', '.join(ATTACKS)}")


def _pgd_step(node: Mapping[str, Any], threat: ThreatModel, key: str) -> float:
    """The node's step in pixel units; an absolute L-inf step above eps is refused (see config.py)."""
    raw = node.get("step")
    if raw is None:
        raise ConfigError(f"{key}.step is missing; {STEP_HELP}")
    step = resolve_step(raw, threat.eps, f"{key}.step")
    if threat.norm == "linf" and relative_step_factor(raw) is None and step > threat.eps * (1 + 1e-9):
        raise ConfigError(
            f"{key}.step={raw!r} ({step:.6g}) is larger than eps={threat.eps:.6g}; set {key}.step=eps/4 "
            "(relative) or a value <= eps"
        )
    return step


def _build_lafeat(node: Mapping[str, Any], threat: ThreatModel, key: str, bn_mode: str) -> LAFEAT:
    betas = node.get("betas")
    head_layers = node.get("head_layers")
    dataset = node.get("head_dataset")
    return LAFEAT(
        threat,
        iterations=_int(node, "iterations", 100),
        betas=[to_float(b, f"{key}.betas") for b in betas]
        if betas is not None
        else [round(0.1 * i, 10) for i in range(10)],
        beta_schedule=bool(node.get("beta_schedule", True)),
        targeted=bool(node.get("targeted", False)),
        n_targets=_int(node, "n_targets", 9),
        layer=None if node.get("layer") in (None, "auto") else str(node["layer"]),
        head_layers=None
        if head_layers in (None, "auto")
        else [head_layers]
        if isinstance(head_layers, str)
        else [str(n) for n in head_layers],
        head_epochs=_int(node, "head_epochs", 100),
        head_samples=_int(node, "head_samples", None),
        head_batch_size=_int(node, "head_batch_size", 128),
        head_lr=to_float(node.get("head_lr", 1e-3), f"{key}.head_lr"),
        head_channels=_int(node, "head_channels", 64),
        head_hidden=_int(node, "head_hidden", 256),
        head_augment=bool(node.get("head_augment", True)),
        head_data=str(node.get("head_data") or "train"),
        head_dataset=None if dataset is None else _plain(dataset),
        head_seed=_int(node, "head_seed", 0),
        cache_dir=node.get("cache_dir"),
        batch_size=_int(node, "batch_size", 500),
        seed=_int(node, "seed", 0),
        bn_mode=bn_mode,
    )


def _plain(value: Any) -> Any:
    """Config containers -> plain dicts/lists (interpolations resolved), so they hash and pickle alike."""
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value


def _int(node: Mapping[str, Any], key: str, default: int | None) -> Any:
    """node[key] when set (validated by the attack, so 0 or -1 are refused there, not replaced)."""
    value = node.get(key)
    return default if value is None else value
