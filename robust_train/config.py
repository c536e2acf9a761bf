"""Config helpers: number parsing and validation of a composed run config before any work starts.

Validation collects every problem it finds and raises one ConfigError listing them, so a user fixes
a bad command line in one round trip. Messages name the full key and the allowed values or range.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch

from robust_train.errors import ConfigError

NORMS = ("linf", "l2")
BN_MODES = ("train", "eval")
RANDOM_STARTS = ("uniform", "normal", "none")
SCHEDULES = ("piecewise", "cosine", "constant")
DEFENSES = ("standard", "pgd_at", "trades", "mart")
ATTACKS = ("clean", "fgsm", "pgd", "cw", "autoattack", "lafeat", "ssa", "ssah")
LAFEAT_HEAD_DATA = ("train", "attacked")
SSA_PROJECTIONS = ("every_step", "final", "none")
AUTOATTACK_VERSIONS = ("standard", "lite")
ATTACK_LOSSES = ("ce", "cw")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")
CHECKPOINT_KINDS = ("best", "last")


from robust_train.schema import (  # noqa: E402  (numbers are parsed in one place)
    STEP_HELP,
    relative_step_factor,
    resolve_step,
    to_float,
)

__all__ = ["STEP_HELP", "relative_step_factor", "resolve_step", "to_float"]


def numeric_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config whose radii and step sizes are numbers in pixel units.

    Configs may write 8/255 or eps/4; results.json and W&B get the numbers every attack used, so a
    column holds one type and can be filtered and plotted across datasets. Unparseable values are left
    as written (validation reports them).
    """
    out = copy.deepcopy(config)

    def convert(node: Any, eps: float | None) -> float | None:
        if not isinstance(node, dict):
            return eps
        try:
            if node.get("eps") is not None:
                node["eps"] = eps = to_float(node["eps"], "eps")
            if node.get("step") is not None and eps is not None:
                node["step"] = resolve_step(node["step"], eps, "step")
        except ConfigError:
            pass
        return eps

    dataset = out.get("dataset")
    if isinstance(dataset, dict):
        convert(dataset.get("threat"), None)
    eps = convert(out.get("threat"), None)
    defense = out.get("defense")
    if isinstance(defense, dict):
        convert(defense.get("attack"), eps)
    suite = out.get("eval")
    for node in ((suite.get("attacks") if isinstance(suite, dict) else None) or {}).values():
        convert(node, eps)
    return out


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

    def step(
        self, node: Any, key: str, path: str, eps: float | None, max_eps: bool = False, optional: bool = False
    ) -> float | None:
        """A step size, absolute or relative to `eps`; with `max_eps`, an absolute step above eps is refused.

        Only absolute steps are bounded: an L-inf PGD step larger than the radius jumps to the ball's
        corners every iteration, which is almost always a step written for another eps. A relative step
        larger than eps (e.g. FGSM-RS's 1.25*eps) is an explicit choice.
        """
        value = _get(node, key)
        full = f"{path}.{key}" if path else key
        if value is None:
            if not optional:
                self.problems.append(f"{full} is missing; {STEP_HELP}")
            return None
        if relative_step_factor(value) is None:
            x = self.number(node, key, path, lo=0.0, lo_open=True)
            if x is not None and max_eps and eps is not None and x > eps * (1 + 1e-9):
                self.problems.append(
                    f"{full}={value!r} ({x:.6g}) is larger than eps={eps:.6g}: an L-inf PGD step above "
                    f"the radius only jumps between the ball's corners; set {full}=eps/4 or a value <= eps"
                )
                return None
            return x
        factor = relative_step_factor(value)
        if factor is None or not factor > 0:
            self.problems.append(f"{full}={value!r} must be positive; {STEP_HELP}")
            return None
        return None if eps is None else factor * eps

    def choice(self, node: Any, key: str, path: str, allowed: tuple[str, ...]) -> str | None:
        value = _get(node, key)
        full = f"{path}.{key}" if path else key
        if value not in allowed:
            self.problems.append(f"{full}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
            return None
        return value

    def boolean(self, node: Any, key: str, path: str, optional: bool = True) -> bool | None:
        value = _get(node, key)
        full = f"{path}.{key}" if path else key
        if value is None and optional:
            return None
        if not isinstance(value, bool):
            self.problems.append(f"{full}={value!r} must be true or false")
            return None
        return value

    def known_keys(self, node: Any, path: str, allowed: tuple[str, ...]) -> None:
        """Keys added with `+` are not caught by Hydra's struct mode: refuse names the code never reads."""
        if node is None or not hasattr(node, "keys"):
            return
        for key in node.keys():
            if key not in allowed:
                self.problems.append(f"{path}.{key} is not a known key; allowed: {', '.join(allowed)}")

    def raise_if_any(self) -> None:
        if self.problems:
            if len(self.problems) == 1:
                raise ConfigError(self.problems[0])
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def _range_text(lo: float | None, hi: float | None, lo_open: bool) -> str:
    left = "" if lo is None else f"{lo:g} {'<' if lo_open else '<='} "
    right = "" if hi is None else f" <= {hi:g}"
    return f"{left}value{right}"


def _check_threat(c: _Checker, threat: Any, path: str = "threat") -> tuple[str | None, float | None]:
    """The run's norm and eps (None where invalid); the validation PGD uses threat.step."""
    norm = c.choice(threat, "norm", path, NORMS)
    # An L-inf radius above 1 covers the whole [0,1] box; L2 radii legitimately exceed 1 on large images.
    eps = c.number(threat, "eps", path, lo=0.0, hi=1.0 if norm != "l2" else None)
    c.step(threat, "step", path, eps, max_eps=norm == "linf")
    return norm, eps


def _check_attack(
    c: _Checker, attack: Any, path: str, threat: tuple[str | None, float | None] = (None, None)
) -> None:
    """One attack node; `threat` is the run's (norm, eps), which the node's own norm/eps override."""
    name = c.choice(attack, "name", path, ATTACKS)
    if name in ("clean", None):
        return
    norm, eps = threat
    if _get(attack, "norm") is not None:
        norm = c.choice(attack, "norm", path, NORMS)
    if name == "lafeat":
        _check_lafeat(c, attack, path)
        return
    if name in ("ssa", "ssah"):
        _check_ssa(c, attack, path, name)
        return
    if name == "autoattack":
        c.choice(attack, "version", path, AUTOATTACK_VERSIONS)
        c.number(attack, "batch_size", path, lo=1, integer=True, optional=True)
        if _get(attack, "eps") is not None:
            c.number(attack, "eps", path, lo=0.0)
        return
    if _get(attack, "eps") is not None:
        eps = c.number(attack, "eps", path, lo=0.0)
    if name in ("pgd", "cw"):
        c.number(attack, "steps", path, lo=0, integer=True)
        c.number(attack, "restarts", path, lo=1, integer=True, optional=True)
        c.step(attack, "step", path, eps, max_eps=norm == "linf")
    elif _get(attack, "step") is not None:
        c.step(attack, "step", path, eps)
    if _get(attack, "loss") is not None:
        c.choice(attack, "loss", path, ATTACK_LOSSES)
    if _get(attack, "random_start") is not None:
        c.choice(attack, "random_start", path, RANDOM_STARTS)
    if _get(attack, "bn_mode") is not None:
        c.choice(attack, "bn_mode", path, BN_MODES)


def _check_lafeat(c: _Checker, attack: Any, path: str) -> None:
    """LAFEAT keys (docs/methods/lafeat.md#presets); L-inf only, so a norm other than linf is refused here."""
    if _get(attack, "norm") not in (None, "linf"):
        c.problems.append(f"{path}.norm={_get(attack, 'norm')!r}: lafeat is an L-inf attack; allowed: linf")
    for key, lo in (("iterations", 0), ("n_targets", 1), ("head_epochs", 0), ("head_batch_size", 1),
                    ("head_channels", 1), ("head_hidden", 1), ("batch_size", 1)):  # fmt: skip
        c.number(attack, key, path, lo=lo, integer=True, optional=True)
    c.number(attack, "head_samples", path, lo=1, integer=True, optional=True)
    c.number(attack, "head_lr", path, lo=0.0, lo_open=True, optional=True)
    if _get(attack, "eps") is not None:
        c.number(attack, "eps", path, lo=0.0, hi=1.0)
    betas = _get(attack, "betas")
    if betas is not None:
        if isinstance(betas, str) or not hasattr(betas, "__len__") or len(betas) == 0:
            c.problems.append(f"{path}.betas={betas!r} must be a non-empty list of numbers in [0, 1]")
        else:
            for i, beta in enumerate(betas):
                c.number({str(i): beta}, str(i), f"{path}.betas", lo=0.0, hi=1.0)
    head_data = (
        c.choice(attack, "head_data", path, LAFEAT_HEAD_DATA) if _get(attack, "head_data") else "train"
    )
    if head_data == "train" and not _get(attack, "head_dataset"):
        c.problems.append(
            f"{path}.head_data=train needs {path}.head_dataset (e.g. ${{dataset}}); or head_data=attacked"
        )
    if _get(attack, "bn_mode") is not None:
        c.choice(attack, "bn_mode", path, BN_MODES)


def _check_linf_only_attacks(c: _Checker, cfg: Any) -> None:
    """LAFEAT inherits the run's norm unless it sets its own: refuse an L2 run before any training."""
    norm = _get(cfg.threat, "norm")
    for name, attack in (_get(cfg.eval, "attacks") or {}).items():
        if attack is None or _get(attack, "name") != "lafeat" or _get(attack, "norm") is not None:
            continue
        if norm not in (None, "linf"):
            c.problems.append(
                f"eval.attacks.{name}: lafeat is an L-inf attack but threat.norm={norm!r}; set "
                f"eval.attacks.{name}.norm=linf (with its own eps) or drop it with ~eval.attacks.{name}"
            )


def _check_ssa(c: _Checker, attack: Any, path: str, name: str) -> None:
    """SSA/SSAH keys (docs/methods/ssa.md#presets); `ssa` is the preset without the low-frequency term."""
    c.number(attack, "iterations", path, lo=0, integer=True, optional=True)
    c.number(attack, "batch_size", path, lo=1, integer=True, optional=True)
    for key in ("lr", "margin", "alpha"):
        c.number(attack, key, path, lo=0.0, optional=True)
    lam = c.number(attack, "lambda_lf", path, lo=0.0, optional=True)
    if name == "ssa" and lam:
        c.problems.append(
            f"{path}.lambda_lf={lam:g}: ssa has no low-frequency term; use name=ssah for lambda_lf > 0"
        )
    if _get(attack, "project") is not None:
        c.choice(attack, "project", path, SSA_PROJECTIONS)
    if _get(attack, "eps") is not None:
        c.number(attack, "eps", path, lo=0.0)
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


def _check_eval(c: _Checker, ev: Any, threat: tuple[str | None, float | None] = (None, None)) -> None:
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
        _check_attack(c, node, f"eval.attacks.{name}", threat)


def _check_logger(c: _Checker, logger: Any) -> None:
    name = c.choice(logger, "name", "logger", LOGGERS)
    if name == "wandb":
        c.choice(logger, "mode", "logger", WANDB_MODES)


def _check_fast(c: _Checker, fast: Any) -> None:
    """trainer.fast: every knob auto/true/false and a known compile mode (absent node: all auto)."""
    from robust_train.training.fastpath import COMPILE_MODES, KNOBS, knob_value

    for key in KNOBS:
        try:
            knob_value(fast, key)
        except ConfigError as err:
            c.problems.append(str(err))
    if fast is not None and _get(fast, "compile_mode") is not None:
        c.choice(fast, "compile_mode", "trainer.fast", COMPILE_MODES)


NAN_POLICIES = ("stop", "skip")
SANITY_KEYS = (
    "enabled", "n_examples", "batch_size", "pgd_steps", "large_eps", "square_queries", "tolerance",
    "max_large_eps_acc", "max_dead_grad_frac",
)  # fmt: skip
# Divergence guard on add-on strengths: values past these make an add-on's term dominate the loss by
# orders of magnitude (the papers use at most: SAT lam 0.5, ISEAT lam 1 / gamma 0.01, LAD eta 1000,
# RWT second_coef 1, SLIM |lambda| 1); they are refused before any work.
ADDON_STRENGTH_LIMITS: dict[str, dict[str, float]] = {
    "sat": {"lam": 100.0, "beta": 100.0},
    "iseat": {"lam": 100.0, "gamma": 1.0},
    "lad": {"eta": 1.0e5},
    "rwt": {"second_coef": 100.0, "noise_std": 1.0},
    "slim": {"lam_low": 100.0, "lam_high": 100.0, "fixed_lambda": 100.0, "task_weight": 100.0},
}
MAX_BETA = 100.0  # TRADES/MART: the papers use 1-6
SHAPE_CHECK_WIDTH = 0.0625


def _check_addon_strengths(c: _Checker, cfg: Any) -> None:
    node = _get(cfg, "addons")
    if not node or not hasattr(node, "items"):
        return
    for name, acfg in node.items():
        for key, limit in ADDON_STRENGTH_LIMITS.get(str(name), {}).items():
            value = _get(acfg, key)
            # ISEAT writes strengths as lists (a range or one value); ListConfig is not a list.
            values = [value] if isinstance(value, str) or not hasattr(value, "__iter__") else list(value)
            for v in values:
                if v is None or isinstance(v, bool):
                    continue
                try:
                    x = to_float(v, f"addons.{name}.{key}")
                except ConfigError:
                    continue  # the add-on's own check names the type error
                if math.isfinite(x) and abs(x) > limit:
                    c.problems.append(
                        f"addons.{name}.{key}={v!r} exceeds the divergence guard: allowed |value| <= "
                        f"{limit:g} (a larger strength drowns the base loss and training diverges)"
                    )


def _check_nan(c: _Checker, t: Any) -> None:
    nan = _get(t, "nan")
    if nan is not None:
        c.known_keys(nan, "trainer.nan", ("policy", "max_skips", "max_term"))
        if _get(nan, "policy") is not None:
            c.choice(nan, "policy", "trainer.nan", NAN_POLICIES)
        c.number(nan, "max_skips", "trainer.nan", lo=0, integer=True, optional=True)
        c.number(nan, "max_term", "trainer.nan", lo=0.0, lo_open=True, optional=True)
    sigs = _get(t, "stop_signals")
    if sigs is not None:
        from robust_train.training.signals import parse_signals

        if isinstance(sigs, str) or not hasattr(sigs, "__iter__"):
            c.problems.append(f"trainer.stop_signals={sigs!r} must be a list, e.g. [SIGTERM, SIGUSR1]")
        else:
            try:
                parse_signals(list(sigs))
            except ConfigError as err:
                c.problems.append(str(err))
    for key in ("resume", "progress", "drop_last"):
        c.boolean(t, key, "trainer")


def _check_sanity(c: _Checker, ev: Any) -> None:
    node = _get(ev, "sanity")
    if node is None:
        return
    path = "eval.sanity"
    c.known_keys(node, path, SANITY_KEYS)
    c.boolean(node, "enabled", path)
    for key in ("n_examples", "batch_size", "pgd_steps"):
        c.number(node, key, path, lo=1, integer=True, optional=True)
    c.number(node, "square_queries", path, lo=0, integer=True, optional=True)
    c.number(node, "large_eps", path, lo=0.0, lo_open=True, optional=True)
    c.number(node, "tolerance", path, lo=0.0, hi=100.0, optional=True)
    c.number(node, "max_large_eps_acc", path, lo=0.0, hi=100.0, optional=True)
    c.number(node, "max_dead_grad_frac", path, lo=0.0, hi=1.0, optional=True)


def _check_shapes(c: _Checker, cfg: Any) -> None:
    """The model must accept the dataset's images: channel statistics and a shape-only forward."""
    ds = cfg.dataset
    shape = _get(ds, "image_shape")
    if shape is None:
        return
    shape = list(shape)
    if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape):
        c.problems.append(
            f"dataset.image_shape={shape!r} must be [channels, height, width] of positive integers"
        )
        return
    for key in ("mean", "std"):
        stats = _get(ds, key)
        if stats is not None and len(list(stats)) != shape[0]:
            c.problems.append(
                f"dataset.{key} has {len(list(stats))} values but dataset.image_shape has {shape[0]} channels"
            )
    if c.problems:
        return
    from robust_train.builders import model_from_config

    classes = int(_get(ds, "num_classes") or 10)
    mean = tuple(_get(ds, "mean") or (0.5,) * shape[0])
    std = tuple(_get(ds, "std") or (0.25,) * shape[0])
    # Width scales channels only, never spatial sizes: a 1/16-width copy on the CPU answers "does this
    # architecture take these images" in milliseconds (the meta device would first import torch's
    # decompositions, seconds per process).
    node = {k: v for k, v in dict(cfg.model).items() if k != "width"}
    try:
        model = model_from_config(
            {**node, "width": SHAPE_CHECK_WIDTH}, num_classes=classes, mean=mean, std=std
        )
    except ConfigError:
        raise
    except Exception:
        return  # a model that cannot be built thin is checked when the real one is built
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *shape))
    except Exception as err:  # shape errors come as RuntimeError/ValueError from torch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        c.problems.append(
            f"model={_get(cfg.model, 'name')} cannot take dataset={_get(ds, 'name')} images of shape "
            f"{shape}: {first}"
        )
        return
    if tuple(out.shape) != (2, classes):
        c.problems.append(
            f"model={_get(cfg.model, 'name')} returns {tuple(out.shape)[1:]} outputs for dataset="
            f"{_get(ds, 'name')}; expected {classes} classes"
        )


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
    threat = _check_threat(c, cfg.threat)

    defense = c.choice(cfg.defense, "name", "defense", DEFENSES)
    if defense in ("trades", "mart"):
        c.number(cfg.defense, "beta", "defense", lo=0.0, hi=MAX_BETA)
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
            _check_attack(c, attack, "defense.attack", threat)
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
    _check_fast(c, _get(t, "fast"))
    _check_nan(c, t)
    _check_eval(c, cfg.eval, threat)
    _check_linf_only_attacks(c, cfg)
    _check_sanity(c, cfg.eval)
    _check_logger(c, cfg.logger)
    _check_addon_strengths(c, cfg)
    if not c.problems:
        from robust_train.addons import check_addons

        c.problems.extend(check_addons(cfg))
    if not c.problems:
        _check_shapes(c, cfg)
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
