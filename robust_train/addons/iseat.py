"""ISEAT: Instance-adaptive Smoothness Enhanced Adversarial Training (docs/methods/iseat.md).

Per step, on top of the base defense (PGD-AT in the paper; TRADES/MART by docs/methods/iseat.md#composition):

1. the base attack crafts x' on the unperturbed weights theta;
2. an AWP-style weight perturbation nu_l = gamma * ||theta_l|| * g_l / ||g_l|| (per layer, from the
   base outer loss on an AWP proxy) is put in place for the outer forward, backward and optimizer step
   and removed afterwards (the project's AWP component, `robust_train.defenses.awp`);
3. the logit-smoothing regularizer LSIW, lambda/m * sum_i w_i * ||f(x'_i; theta+nu) - f(x_i; theta)||^2,
   is added, where w_i = 1 - r(AV_i)/m ranks the batch by AV_i = CE(x'_i; theta+nu) - CE(x_i; theta)
   (rank 0 = most vulnerable). Gradients flow through both branches (Eq. 17): the clean branch is
   evaluated at theta, the adversarial one at theta+nu.

lambda and gamma are per-LR-stage lists (stage = number of trainer.schedule.milestones <= epoch; a short
list repeats its last entry), so the default lambda [0, 0.1] switches the regularizer on at the first LR
decay. An optional epsilon warm start (SVHN, the released code's `-ws`) ramps the training attack's eps
and step by epoch/W for epochs < W, with lambda = 0 and no nu there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BeforeValidator
from torch import nn
from torch.func import functional_call

from robust_train.addons.base import Addon, AddonConfig, AddonContext, divergence_guard
from robust_train.attacks import ThreatModel
from robust_train.defenses.awp import AWP, perturbed_parameter_names
from robust_train.defenses.losses import kl_clean_adv
from robust_train.errors import ConfigError
from robust_train.registry import ADDONS
from robust_train.schema import Integer, Number, to_float
from robust_train.step_types import CleanReference, StepForwards, StepLoss

WEIGHTINGS = ("linear", "top10", "uniform")
DISTANCES = ("sql2", "kl")
PAIRINGS = ("lsiw", "lsi", "trades_awp")
CLEAN_POINTS = ("input", "attack_start")

__all__ = [
    "CLEAN_POINTS",
    "DISTANCES",
    "ISEAT",
    "ISEATConfig",
    "PAIRINGS",
    "WEIGHTINGS",
    "batch_ranks",
    "instance_weights",
    "logit_distance",
    "rank_weights",
    "smoothing_term",
    "stage_of",
    "stage_value",
]


# ----------------------------------------------------------------------------- pure pieces


def stage_of(epoch: int, milestones: Sequence[float]) -> int:
    """The LR stage of a 0-based epoch: how many milestones are <= epoch (the piecewise schedule's rule)."""
    return sum(1 for m in milestones if epoch >= float(m))


def stage_value(values: Sequence[float], stage: int) -> float:
    """values[stage], or the last entry when the list is shorter than the number of stages."""
    return float(values[min(stage, len(values) - 1)])


def batch_ranks(av: torch.Tensor) -> torch.Tensor:
    """r(AV_i) in {0..m-1}, 0 for the largest AV; ties broken by position (stable sort,
    docs/methods/iseat.md#rank-weights)."""
    av = av.detach()
    order = torch.argsort(av, descending=True, stable=True)
    return torch.empty_like(order).scatter_(0, order, torch.arange(av.shape[0], device=av.device))


def rank_weights(av: torch.Tensor) -> torch.Tensor:
    """Eq. 14: w_i = 1 - r(AV_i)/m, so the most vulnerable example gets 1 and the least 1/m."""
    dtype = av.dtype if av.is_floating_point() else torch.get_default_dtype()
    return 1.0 - batch_ranks(av).to(dtype) / av.shape[0]


def instance_weights(av: torch.Tensor, scheme: str = "linear", top_fraction: float = 0.1) -> torch.Tensor:
    """Per-example weights without gradient: 'linear' (Eq. 14), 'top10' (1 for the ceil(top_fraction*m)
    highest AV, else 0; docs/methods/iseat.md#variants) or 'uniform' (all 1; Table 8's unweighted rows)."""
    if scheme == "linear":
        return rank_weights(av)
    dtype = av.dtype if av.is_floating_point() else torch.get_default_dtype()
    if scheme == "top10":
        k = max(1, math.ceil(top_fraction * av.shape[0] - 1e-9))
        return (batch_ranks(av) < k).to(dtype)
    if scheme == "uniform":
        return torch.ones(av.shape, dtype=dtype, device=av.device)
    raise ConfigError(f"addons.iseat.weighting={scheme!r} is not known; allowed: {', '.join(WEIGHTINGS)}")


def logit_distance(z: torch.Tensor, target: torch.Tensor, kind: str = "sql2") -> torch.Tensor:
    """Per-example discrepancy: 'sql2' = sum over classes of squared logit differences (Eq. 9);
    'kl' = KL(softmax target || softmax z) (docs/methods/iseat.md#variants)."""
    if kind == "sql2":
        return (z - target).pow(2).sum(dim=1)
    if kind == "kl":
        return kl_clean_adv(z, target)
    raise ConfigError(f"addons.iseat.distance={kind!r} is not known; allowed: {', '.join(DISTANCES)}")


def smoothing_term(
    z: torch.Tensor,
    target: torch.Tensor,
    av: torch.Tensor,
    lam: float,
    weighting: str = "linear",
    distance: str = "sql2",
    top_fraction: float = 0.1,
) -> torch.Tensor:
    """(lam/m) * sum_i w_i * d(z_i, target_i): the LSIW part of Eq. 15, with gradient through z and target."""
    w = instance_weights(av, weighting, top_fraction).to(z.dtype)
    return lam * (w * logit_distance(z, target, distance)).sum() / z.shape[0]


# ----------------------------------------------------------------------------- config


def _stage_list(value: Any) -> list[float]:
    """A scalar or a list of non-negative numbers (one per LR stage) as a list of floats."""
    items = [value] if isinstance(value, str | int | float | bool) or value is None else list(value)
    try:
        values = [to_float(v, "stage value") for v in items]
    except ConfigError:
        raise ValueError("is not a number or a list of numbers; write e.g. 0.1 or [0, 0.1]") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise ValueError("is out of range: allowed a number >= 0 or a list of them")
    return values


def _known(allowed: tuple[str, ...]) -> AfterValidator:
    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"is not known; allowed: {', '.join(allowed)}")
        return value

    return AfterValidator(check)


def _top_fraction(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"addons.iseat.top_fraction={value} is out of range: allowed 0 < value <= 1")
    return value


def _epochs(value: Any) -> Any:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("is out of range: allowed an integer >= 0")
    return value


class ISEATConfig(AddonConfig):
    """`addons.iseat` (docs/methods/iseat.md#presets)."""

    # lambda per LR stage (stage = number of trainer.schedule.milestones <= epoch; a shorter list repeats
    # its last entry): [0, 0.1] = no regularizer until the first LR decay, 0.1 after.
    lam: Annotated[list[float], BeforeValidator(_stage_list), divergence_guard(100.0)] = [0.0, 0.1]
    # gamma per LR stage: relative per-layer radius of nu, ||nu_l|| = gamma * ||theta_l||; 0 = no nu.
    # 0.007 for CIFAR-10; 0.005 CIFAR-100 / TinyImageNet / extra data; 0.009 SVHN.
    gamma: Annotated[list[float], BeforeValidator(_stage_list), divergence_guard(1.0)] = [0.007]
    # linear (Eq. 14) | top10 (1 for the top_fraction most vulnerable, else 0) | uniform.
    weighting: Annotated[str, _known(WEIGHTINGS)] = "linear"
    # Share of the batch weighted 1 by weighting=top10, in (0, 1].
    top_fraction: Annotated[Number, AfterValidator(_top_fraction)] = 0.1
    # sql2 (sum of squared logit differences, Eq. 9) | kl (KL(p(x; theta) || p(x'; theta+nu))).
    distance: Annotated[str, _known(DISTANCES)] = "sql2"
    # lsiw f(x';theta+nu) vs f(x;theta) | lsi f(x';theta) vs f(x;theta) | trades_awp (Table 9).
    pairing: Annotated[str, _known(PAIRINGS)] = "lsiw"
    # Where f(x; theta) is taken: input (x) | attack_start (the released code under a random start).
    clean_point: Annotated[str, _known(CLEAN_POINTS)] = "input"
    # Epsilon warm start (SVHN, the code's `-ws`): eps and step x t/W for epochs t < W, no regularizer
    # and no nu there; 0 = off.
    warm_start_epochs: Annotated[Integer, BeforeValidator(_epochs)] = 0


def _milestones(run_cfg: Any) -> list[float]:
    """The LR milestones the stage lists follow (none unless the schedule is piecewise)."""
    trainer = run_cfg.get("trainer") if run_cfg is not None and hasattr(run_cfg, "get") else None
    sched = trainer.get("schedule") if trainer is not None else None
    if sched is None or sched.get("name", "piecewise") != "piecewise":
        return []
    return sorted(float(m) for m in (sched.get("milestones") or []))


@dataclass
class _References:
    """Forwards at the unperturbed weights theta, with gradient, for the current step."""

    clean: torch.Tensor | None  # f(x; theta) (None for the 'trades_awp' pairing)
    adv: torch.Tensor | None  # f(x'; theta) (the 'lsi' pairing while nu is on)


# ----------------------------------------------------------------------------- the add-on


@ADDONS.register("iseat", schema=ISEATConfig)
class ISEAT(Addon):
    """AWP-style per-layer weight perturbation plus the rank-weighted logit-smoothing regularizer."""

    name = "iseat"
    # Needs an adversarial batch, so not the clean-only 'standard' defense.
    needs_adversarial = True
    # It brings its own weight perturbation: a second one (the base defense's AWP) would fight it.
    supports_awp = False
    conflicts_with: tuple[str, ...] = ()

    def __init__(self, cfg: Any, ctx: AddonContext) -> None:
        super().__init__(cfg, ctx)
        cfg = self.cfg
        self.lam = list(cfg.lam)
        self.gamma = list(cfg.gamma)
        self.weighting = cfg.weighting
        self.distance = cfg.distance
        self.pairing = cfg.pairing
        self.top_fraction = cfg.top_fraction
        self.clean_point = cfg.clean_point
        self.warm_start_epochs = cfg.warm_start_epochs
        self.milestones = _milestones(ctx.cfg)
        # The project's AWP component computes nu (proxy, per-layer norm) and restores it after the step;
        # its gamma is set per epoch from the stage list.
        self.awp = AWP(0.0)
        self.epoch = 0
        self.lam_t = 0.0
        self.gamma_t = 0.0
        self.ramp = 1.0
        self._x_start: torch.Tensor | None = None
        self._ref: _References | None = None
        self.on_epoch_start(0)

    # ------------------------------------------------------------------ config
    @classmethod
    def check_config(cls, cfg: Any, run_cfg: Any) -> list[str]:
        problems: list[str] = []
        if cfg is not None and not _milestones(run_cfg):
            for key in ("lam", "gamma"):
                values = list(getattr(cfg, key))
                if len(values) > 1:
                    problems.append(
                        f"addons.iseat.{key}={values} is a per-LR-stage list, but trainer.schedule has no "
                        "piecewise milestones, so only its first entry would ever be used; give one value "
                        f"(e.g. addons.iseat.{key}=[{values[-1]}]) or use a piecewise schedule"
                    )
        return problems

    # ------------------------------------------------------------------ schedule
    def on_epoch_start(self, epoch: int) -> None:
        """lambda_t and gamma_t from the stage lists; the eps warm start switches both off."""
        self.epoch = int(epoch)
        stage = stage_of(self.epoch, self.milestones)
        lam, gamma = stage_value(self.lam, stage), stage_value(self.gamma, stage)
        if self.epoch < self.warm_start_epochs:
            # The released code's `-ws`: eps and step x t/W, no regularizer and no nu
            # (docs/methods/iseat.md#warm-start).
            self.ramp = self.epoch / self.warm_start_epochs
            lam = gamma = 0.0
        else:
            self.ramp = 1.0
        self.lam_t, self.gamma_t = lam, gamma
        self.awp.gamma = gamma
        self.awp.on_epoch_start(self.epoch)

    def state_dict(self) -> dict[str, Any]:
        # Everything else is a function of the epoch.
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.on_epoch_start(int(state.get("epoch", self.epoch)))

    # ------------------------------------------------------------------ attack stage
    @contextmanager
    def attack_context(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
        self._x_start = None
        # Any: the eps ramp swaps attributes of threat-model attacks (PGD/FGSM), checked just below.
        attack: Any = self.ctx.defense.attack
        if self.ramp >= 1.0 or attack is None or not hasattr(attack, "step_size"):
            yield
            return
        threat, step = attack.threat, attack.step_size
        attack.threat = ThreatModel(threat.norm, threat.eps * self.ramp)
        attack.step_size = step * self.ramp
        try:
            yield
        finally:
            attack.threat, attack.step_size = threat, step

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
        # Adds nothing to the attack; with clean_point=attack_start it records the attack's first input
        # (the released code's "clean" point under a random start, docs/methods/iseat.md#clean-point).
        if self.clean_point == "attack_start" and self.lam_t > 0 and self._x_start is None:
            self._x_start = x_adv.detach()
        return None

    # ------------------------------------------------------------------ outer stage
    def _references(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> _References:
        """The forwards the regularizer needs at theta, taken before nu is put in place.

        One extra forward per step (two for 'lsi' with nu on): the attack's first forward is at x too,
        but the attack freezes the weights, so its graph cannot carry the clean-branch gradient
        (docs/methods/iseat.md#cost: K+3 forwards, the released code's count, instead of K+2).
        """
        nu_on = self.awp.active
        pairing = self.pairing if nu_on else "lsiw"  # without nu, LSI and LSIW coincide
        if pairing == "trades_awp":
            return _References(clean=None, adv=None)
        state: dict[str, torch.Tensor] = dict(model.named_parameters())
        if nu_on:
            # nu is added to these tensors in place next; the clones keep this graph at theta and
            # still pass its gradient on to theta (Eq. 17's clean branch).
            for name in perturbed_parameter_names(model):
                state[name] = state[name].clone()
        # Cloned buffers: the model's BN running statistics were already updated by the attack's first
        # forward at x and must not be updated a second time (docs/methods/iseat.md#batchnorm).
        state.update({name: b.clone() for name, b in model.named_buffers()})
        x_clean = self._x_start if self._x_start is not None else x
        clean = functional_call(model, state, (x_clean,))
        adv = functional_call(model, state, (x_adv,)) if pairing == "lsi" else None
        return _References(clean=clean, adv=adv)

    @contextmanager
    def weight_perturbation(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor | None,
        base_loss: Callable[[nn.Module], torch.Tensor],
    ) -> Iterator[None]:
        self._ref = None
        try:
            if self.lam_t > 0 and x_adv is not None:
                self._ref = self._references(model, x, x_adv)
            # nu from the base outer loss on the proxy (PGD-AT: mean CE(x'),
            # docs/methods/iseat.md#weight-perturbation; TRADES/MART:
            # their own loss, docs/methods/iseat.md#composition; applied for the outer step, then removed.
            with self.awp.perturb(model, base_loss):
                yield
        finally:
            self._ref = None
            self._x_start = None

    def outer_loss(self, out: StepForwards, base: StepLoss) -> dict[str, Any]:
        ref = self._ref
        if ref is None:
            return {}
        z_adv = out.logits("adv")  # f(x'; theta+nu), the shared outer forward
        if ref.clean is None:
            # TRADES-AWP pairing (Table 9): both logits at theta+nu, from the shared forwards.
            target, z = out.logits("clean"), z_adv
        else:
            target, z = ref.clean, (ref.adv if ref.adv is not None else z_adv)
        with torch.no_grad():
            # Eq. 13: vulnerability under the input and the weight attack; it only orders the batch.
            av = F.cross_entropy(z_adv, out.y, reduction="none") - F.cross_entropy(
                target, out.y, reduction="none"
            )
        term = smoothing_term(z, target, av, self.lam_t, self.weighting, self.distance, self.top_fraction)
        return {"lsiw": term}
