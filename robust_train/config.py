"""Config helpers: number parsing and validation of a composed run config before any work starts.

Validation collects every problem it finds and raises one ConfigError listing them, so a user fixes
a bad command line in one round trip. Messages name the full key and the allowed values or range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import torch

from robust_train.errors import ConfigError

NORMS = ("linf", "l2")
BN_MODES = ("train", "eval")
RANDOM_STARTS = ("uniform", "normal", "none")
SCHEDULES = ("piecewise", "cosine", "constant")
DEFENSES = ("standard", "pgd_at", "trades", "mart")
ATTACKS = ("clean", "fgsm", "pgd", "cw", "autoattack")
AUTOATTACK_VERSIONS = ("standard", "lite")
ATTACK_LOSSES = ("ce", "cw")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
CHECKPOINT_KINDS = ("best", "last")


def to_float(value: Any, key: str) -> float:
    """Parse a number written as 0.03, 8/255 or "8/255"; raise ConfigError naming `key` otherwise."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a number; write e.g. 0.03 or 8/255")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            pass
    raise ConfigError(f"{key}={value!r} is not a number; write e.g. 0.03 or 8/255")


def _get(node: Any, key: str, default: Any = None) -> Any:
    if node is None:
        return default
    if isinstance(node, Mapping) or hasattr(node, "get"):
        return node.get(key, default)
    return default


class _Checker:
    """Accumulates problems so that one run reports all of them at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def number(
        self,
        node: Any,
        key: str,
        path: str,
        lo: float | None = None,
        hi: float | None = None,
        lo_open: bool = False,
        integer: bool = False,
        optional: bool = False,
    ) -> float | None:
        value = _get(node, key)
        full = f"{path}.{key}" if path else key
        if value is None:
            if not optional:
                self.problems.append(f"{full} is missing; it must be a number")
            return None
        try:
            x = to_float(value, full)
        except ConfigError as err:
            self.problems.append(str(err))
            return None
        rng = _range_text(lo, hi, lo_open)
        if not math.isfinite(x):
            self.problems.append(f"{full}={value!r} must be finite ({rng})")
            return None
        if integer and x != int(x):
            self.problems.append(f"{full}={value!r} must be an integer ({rng})")
            return None
        if (lo is not None and (x < lo or (lo_open and x == lo))) or (hi is not None and x > hi):
            self.problems.append(f"{full}={value!r} is out of range: allowed {rng}")
            return None
        return x

    def choice(self, node: Any, key: str, path: str, allowed: tuple[str, ...]) -> str | None:
        value = _get(node, key)
        full = f"{path}.{key}" if path else key
        if value not in allowed:
            self.problems.append(f"{full}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
            return None
        return value

    def raise_if_any(self) -> None:
        if self.problems:
            if len(self.problems) == 1:
                raise ConfigError(self.problems[0])
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def _range_text(lo: float | None, hi: float | None, lo_open: bool) -> str:
    left = "" if lo is None else f"{lo:g} {'<' if lo_open else '<='} "
    right = "" if hi is None else f" <= {hi:g}"
    return f"{left}value{right}"


def _check_threat(c: _Checker, threat: Any, path: str = "threat") -> None:
    norm = c.choice(threat, "norm", path, NORMS)
    # An L-inf radius above 1 covers the whole [0,1] box; L2 radii legitimately exceed 1 on large images.
    c.number(threat, "eps", path, lo=0.0, hi=1.0 if norm != "l2" else None)
    c.number(threat, "step", path, lo=0.0, lo_open=True)


def _check_attack(c: _Checker, attack: Any, path: str) -> None:
    name = c.choice(attack, "name", path, ATTACKS)
    if name in ("clean", None):
        return
    if _get(attack, "norm") is not None:
        c.choice(attack, "norm", path, NORMS)
    if name == "autoattack":
        c.choice(attack, "version", path, AUTOATTACK_VERSIONS)
        c.number(attack, "batch_size", path, lo=1, integer=True, optional=True)
        if _get(attack, "eps") is not None:
            c.number(attack, "eps", path, lo=0.0)
        return
    if name in ("pgd", "cw"):
        c.number(attack, "steps", path, lo=0, integer=True)
        c.number(attack, "restarts", path, lo=1, integer=True, optional=True)
    if _get(attack, "loss") is not None:
        c.choice(attack, "loss", path, ATTACK_LOSSES)
    if _get(attack, "step") is not None:
        c.number(attack, "step", path, lo=0.0, lo_open=True)
    if _get(attack, "eps") is not None:
        c.number(attack, "eps", path, lo=0.0)
    if _get(attack, "random_start") is not None:
        c.choice(attack, "random_start", path, RANDOM_STARTS)
    if _get(attack, "bn_mode") is not None:
        c.choice(attack, "bn_mode", path, BN_MODES)


def _check_device(c: _Checker, device: Any) -> None:
    if device in (None, "auto", "cpu"):
        return
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        c.problems.append(f"device={device!r} is not a torch device; allowed: auto, cpu, cuda, cuda:N")
        return
    if dev.type == "cuda" and not torch.cuda.is_available():
        c.problems.append(f"device={device!r} but CUDA is not available here; use device=auto or device=cpu")


def _check_eval(c: _Checker, ev: Any) -> None:
    c.number(ev, "n_examples", "eval", lo=1, integer=True, optional=True)
    c.number(ev, "batch_size", "eval", lo=1, integer=True)
    for kind in _get(ev, "checkpoints", []) or []:
        if kind not in CHECKPOINT_KINDS:
            c.problems.append(f"eval.checkpoints contains {kind!r}; allowed: {', '.join(CHECKPOINT_KINDS)}")
    attacks = _get(ev, "attacks")
    if not attacks:
        c.problems.append("eval.attacks is empty; add at least `clean`")
        return
    for name, node in attacks.items():
        if node is None:  # removed from the suite on the command line with eval.attacks.NAME=null
            continue
        _check_attack(c, node, f"eval.attacks.{name}")


def _check_logger(c: _Checker, logger: Any) -> None:
    name = c.choice(logger, "name", "logger", LOGGERS)
    if name == "wandb":
        c.choice(logger, "mode", "logger", WANDB_MODES)


def validate_train_config(cfg: Any) -> None:
    """Check a composed training config; raise one ConfigError describing every problem found."""
    from robust_train.data import DATASET_NAMES
    from robust_train.models import MODEL_NAMES

    c = _Checker()
    c.number(cfg, "seed", "", lo=0, integer=True)
    _check_device(c, _get(cfg, "device"))
    c.choice(cfg.dataset, "name", "dataset", DATASET_NAMES)
    c.choice(cfg.model, "name", "model", MODEL_NAMES)
    c.number(cfg.model, "width", "model", lo=0.0, lo_open=True, hi=16.0)
    _check_threat(c, cfg.threat)

    defense = c.choice(cfg.defense, "name", "defense", DEFENSES)
    if defense in ("trades", "mart"):
        c.number(cfg.defense, "beta", "defense", lo=0.0)
    awp = _get(cfg.defense, "awp")
    if awp is not None and _get(awp, "enabled"):
        if defense == "standard":
            c.problems.append("defense.awp.enabled=true needs an adversarial defense (pgd_at, trades, mart)")
        c.number(awp, "gamma", "defense.awp", lo=0.0, hi=1.0)
        c.number(awp, "warmup_epochs", "defense.awp", lo=0, integer=True)
    attack = _get(cfg.defense, "attack")
    if defense == "standard" and attack is not None:
        c.problems.append("defense=standard trains on clean inputs; defense.attack must be null")
    if defense not in ("standard", None):
        if attack is None:
            c.problems.append(f"defense={defense} needs a training attack: defense.attack is null")
        else:
            _check_attack(c, attack, "defense.attack")
            if _get(attack, "name") == "autoattack":
                c.problems.append("defense.attack cannot be autoattack: it is an evaluation-only attack")

    t = cfg.trainer
    c.number(t, "epochs", "trainer", lo=1, integer=True)
    c.number(t, "batch_size", "trainer", lo=1, integer=True)
    c.number(t, "max_batches", "trainer", lo=1, integer=True, optional=True)
    c.number(t, "log_every", "trainer", lo=1, integer=True)
    opt = _get(t, "optimizer")
    c.number(opt, "lr", "trainer.optimizer", lo=0.0, lo_open=True)
    c.number(opt, "momentum", "trainer.optimizer", lo=0.0, hi=1.0)
    c.number(opt, "weight_decay", "trainer.optimizer", lo=0.0)
    if _get(opt, "nesterov") and not (to_float(_get(opt, "momentum", 0), "m") > 0):
        c.problems.append("trainer.optimizer.nesterov=true needs trainer.optimizer.momentum > 0")
    sched = _get(t, "schedule")
    c.choice(sched, "name", "trainer.schedule", SCHEDULES)
    c.number(sched, "gamma", "trainer.schedule", lo=0.0, lo_open=True, hi=1.0)
    c.number(sched, "warmup_epochs", "trainer.schedule", lo=0, optional=True)
    for m in _get(sched, "milestones", []) or []:
        if not isinstance(m, int | float) or isinstance(m, bool) or m < 0:
            c.problems.append(f"trainer.schedule.milestones contains {m!r}; milestones are epochs >= 0")
    val = _get(t, "validation")
    c.number(val, "every", "trainer.validation", lo=1, integer=True)
    c.number(val, "pgd_steps", "trainer.validation", lo=0, integer=True)
    c.number(val, "max_examples", "trainer.validation", lo=1, integer=True, optional=True)
    c.number(val, "batch_size", "trainer.validation", lo=1, integer=True)
    _check_eval(c, cfg.eval)
    _check_logger(c, cfg.logger)
    if not c.problems:
        from robust_train.addons import check_addons

        c.problems.extend(check_addons(cfg))
    c.raise_if_any()


def validate_eval_config(cfg: Any) -> None:
    """Check the parts of a `robust-eval` config that can be checked before the checkpoint is read.

    The eval suite interpolates the threat model, which comes from the checkpoint: it is checked on the
    merged config (`validate_train_config`).
    """
    c = _Checker()
    _check_device(c, _get(cfg, "device"))
    c.number(cfg, "seed", "", lo=0, integer=True)
    _check_logger(c, cfg.logger)
    c.raise_if_any()


def resolve_device(device: str | None) -> torch.device:
    """`auto` picks CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(device))
