"""SSA and SSAH (Luo et al., CVPR 2022): semantic-similarity attacks on penultimate features
(docs/methods/ssa.md).

One implementation, two presets (docs/methods/ssa.md#naming): `ssa` is the semantic-similarity
loss alone (lambda_lf = 0), `ssah` adds the Haar low-frequency term (lambda_lf = 0.1 on CIFAR-10).

Per batch, only the images the model classifies correctly are attacked (the others are returned
unchanged and count as errors). The variable is w with x_adv = (tanh(w) + 1) / 2, optimized by Adam.
Features are the input of the model's final linear layer (`feature_input_of`, default `fc`), taken with
a forward pre-hook during the ordinary forward, so no architecture is rebuilt by hand. The negative of
each image is the most dissimilar clean image of the same attacked batch, picked at iteration 0 and then
frozen; results therefore depend on the batch, and `batch_size` is logged beside every number.

The reference attack is unbounded. For robustness evaluation it is bounded by the run's threat model
(`project`): `every_step` (default) projects x_adv onto the eps-ball and the box after every Adam step
and re-derives w from it, keeping Adam's state; `final` projects once at the end; `none` is the
unbounded reference attack. `report` holds the projection mode, the mean and max L-inf of the
perturbations of the attacked images, the attack batch size and the attack success rate.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ValidationInfo, field_validator
from torch import nn

from robust_train.attacks.base import Attack, AttackConfig, BNMode, Objective
from robust_train.attacks.threat import ThreatModel
from robust_train.errors import ConfigError
from robust_train.models.features import resolve_layer
from robust_train.registry import ATTACKS
from robust_train.schema import NonNegativeInt, NonNegativeNumber, PositiveInt

PROJECT_MODES = ("every_step", "final", "none")


class SSAConfig(AttackConfig):
    """`ssa`: the semantic-similarity loss alone (docs/methods/ssa.md#presets, #naming)."""

    iterations: NonNegativeInt = 150
    lr: NonNegativeNumber = 1e-3  # CIFAR-10 reference; 1.5e-3 for CIFAR-100
    margin: NonNegativeNumber = 0.2
    alpha: NonNegativeNumber = 1.0
    lambda_lf: NonNegativeNumber = 0.0
    project: Literal["every_step", "final", "none"] = "every_step"
    # Negatives come from the batch, so the batch size changes the result (reference: 5000 with
    # ResNet-20; 500 fits PreActResNet-18 / WRN-34-10 activations on one GPU).
    batch_size: PositiveInt = 500
    feature_input_of: str = "fc"
    bn_mode: BNMode = "eval"

    # A field validator, not a cross-field `check`: it is reported beside the other fields' problems.
    @field_validator("lambda_lf")
    @classmethod
    def _ssa_has_no_low_frequency_term(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("name") == "ssa" and value:
            raise ValueError(": ssa has no low-frequency term; use name=ssah for lambda_lf > 0")
        return value


class SSAHConfig(SSAConfig):
    """`ssah`: SSA plus the Haar low-frequency term (lambda_lf 0.1 on CIFAR-10; 0.01 on CIFAR-100)."""

    lambda_lf: NonNegativeNumber = 0.1


_TANH_GUARD = 3e-7  # keeps atanh finite at pixels of exactly 0 or 1 (the reference's constant)


def haar_low_pass(x: torch.Tensor) -> torch.Tensor:
    """One-level Haar DWT, keep LL, inverse DWT with zero detail bands.

    For the orthonormal Haar filters this is exactly 2x2 average pooling followed by 2x nearest
    upsampling (docs/methods/ssa.md#algorithm). Odd sizes are padded by edge replication and cropped back.
    """
    h, w = x.shape[-2:]
    pad = (0, w % 2, 0, h % 2)
    xp = F.pad(x, pad, mode="replicate") if any(pad) else x
    low = F.interpolate(F.avg_pool2d(xp, 2), scale_factor=2, mode="nearest")
    return low[..., :h, :w]


def to_tanh_space(x: torch.Tensor) -> torch.Tensor:
    """w with (tanh(w) + 1) / 2 = x up to 1.5e-7: atanh((2x - 1)(1 - 3e-7))."""
    return torch.atanh((2 * x - 1) * (1 - _TANH_GUARD))


def from_tanh_space(w: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(w) + 1) / 2


def ssa_loss(
    feats: torch.Tensor, clean_feats: torch.Tensor, negatives: torch.Tensor, margin: float
) -> torch.Tensor:
    """sum_i max(w+_i s+_i - w-_i s-_i, 0) on cosine similarities; w+, w- detached
    (docs/methods/ssa.md#algorithm)."""
    sim = F.normalize(feats, dim=1) @ F.normalize(clean_feats, dim=1).T
    idx = torch.arange(sim.shape[0], device=sim.device)
    s_pos, s_neg = sim[idx, idx], sim[idx, negatives]
    w_pos = (s_pos - margin).clamp_min(0).detach()
    w_neg = (1 + margin - s_neg).clamp_min(0).detach()
    return (w_pos * s_pos - w_neg * s_neg).clamp_min(0).sum()


@ATTACKS.register("ssah", schema=SSAHConfig)
class SSAH(Attack):
    """SSAH (lambda_lf > 0) or SSA (lambda_lf = 0); see the module docstring."""

    name = "ssah"
    whole_set = True

    def __init__(
        self,
        threat: ThreatModel,
        iterations: int = 150,
        lr: float = 1e-3,
        margin: float = 0.2,
        alpha: float = 1.0,
        lambda_lf: float = 0.1,
        project: str = "every_step",
        batch_size: int = 500,
        feature_input_of: str = "fc",
        bn_mode: str = "eval",
        name: str = "ssah",
    ) -> None:
        super().__init__(bn_mode)
        if project not in PROJECT_MODES:
            raise ConfigError(
                f"{name}.project={project!r} is not allowed; choose one of: {', '.join(PROJECT_MODES)}"
            )
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ConfigError(f"{name}.iterations={iterations!r} must be an integer >= 0")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"{name}.batch_size={batch_size!r} must be an integer >= 1")
        for key, value in (("lr", lr), ("margin", margin), ("alpha", alpha), ("lambda_lf", lambda_lf)):
            if not float(value) >= 0:
                raise ConfigError(f"{name}.{key}={value!r} must be a number >= 0")
        if name not in ("ssa", "ssah"):
            raise ConfigError(f"attack name {name!r} is not one of: ssa, ssah")
        if name == "ssa" and lambda_lf != 0:
            raise ConfigError(f"ssa.lambda_lf={lambda_lf!r}: SSA has no low-frequency term; use name=ssah")
        self.name = name
        self.threat = threat
        self.iterations = iterations
        self.lr = float(lr)
        self.margin = float(margin)
        self.alpha = float(alpha)
        self.lambda_lf = float(lambda_lf)
        self.project = project
        self.batch_size = batch_size
        self.feature_input_of = feature_input_of
        self.report: dict[str, Any] = {}

    def _features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Input of the final linear layer during an ordinary forward (a pre-hook, no rebuilt model)."""
        captured: list[torch.Tensor] = []
        handle = resolve_layer(model, self.feature_input_of).register_forward_pre_hook(
            lambda _m, inputs: captured.append(inputs[0])
        )
        try:
            model(x)
        finally:
            handle.remove()
        if not captured:
            raise ConfigError(
                f"{self.name}.feature_input_of={self.feature_input_of!r} was not called in the forward"
            )
        return captured[-1].flatten(1)

    def _bound(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x + self.threat.project(x_adv - x, x)

    def attack_batch(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SSA/SSAH on a batch of (correctly classified) images; returns (x_adv, unprojected x_adv)."""
        with torch.no_grad():
            clean_feats = self._features(model, x)
            low = haar_low_pass(x)
        self.forward_passes += 1
        w = to_tanh_space(x).requires_grad_(True)
        opt = torch.optim.Adam([w], lr=self.lr)
        negatives: torch.Tensor | None = None
        for _ in range(self.iterations):
            x_adv = from_tanh_space(w)
            feats = self._features(model, x_adv)
            if negatives is None:
                with torch.no_grad():
                    sim = F.normalize(feats, dim=1) @ F.normalize(clean_feats, dim=1).T
                    # The most dissimilar clean image of the batch (itself included), then frozen.
                    negatives = sim.argmin(dim=1)
            loss = self.alpha * ssa_loss(feats, clean_feats, negatives, self.margin)
            if self.lambda_lf > 0:
                loss = loss + self.lambda_lf * F.smooth_l1_loss(haar_low_pass(x_adv), low, reduction="sum")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.forward_passes += 1
            self.backward_passes += 1
            if self.project == "every_step":
                with torch.no_grad():
                    w.copy_(to_tanh_space(self._bound(from_tanh_space(w), x)))
        with torch.no_grad():
            raw = from_tanh_space(w)
            # every_step: the tanh round trip may overshoot eps by ~1e-7; the final projection removes it.
            out = raw.clamp(0, 1) if self.project == "none" else self._bound(raw, x)
        return out.detach(), raw.detach()

    @classmethod
    def from_config(cls, cfg: SSAConfig, threat: ThreatModel, key: str) -> SSAH:  # type: ignore[override]
        return cls(threat, **cfg.options(), name=cfg.name)

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
    ) -> torch.Tensor:
        x = x.detach()
        resolve_layer(model, self.feature_input_of)  # a bad name fails before any work
        start = time.perf_counter()
        x_adv = x.clone()
        attacked = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        raw_linf = torch.zeros(x.shape[0], device=x.device)
        for i in range(0, x.shape[0], self.batch_size):
            xb, yb = x[i : i + self.batch_size], y[i : i + self.batch_size]
            with torch.no_grad():
                correct = model(xb).argmax(1) == yb
            self.forward_passes += 1
            idx = correct.nonzero().flatten()
            if idx.numel() == 0:
                continue
            out, raw = self.attack_batch(model, xb[idx])
            x_adv[i + idx] = out
            attacked[i + idx] = True
            raw_linf[i + idx] = (raw - xb[idx]).flatten(1).abs().amax(1)
        with torch.no_grad():
            n_att = int(attacked.sum())
            linf = (x_adv - x).flatten(1).abs().amax(1)[attacked]
            fooled = 0
            for i in range(0, x.shape[0], self.batch_size):
                sel = attacked[i : i + self.batch_size]
                if sel.any():
                    self.forward_passes += 1
                    pred = model(x_adv[i : i + self.batch_size][sel]).argmax(1)
                    fooled += int((pred != y[i : i + self.batch_size][sel]).sum())
        self.report = {
            "projection": self.project,
            "eps": self.threat.eps,
            "batch_size": self.batch_size,
            "lambda_lf": self.lambda_lf,
            "attacked": n_att,
            "mean_linf": round(float(linf.mean()), 6) if n_att else 0.0,
            "max_linf": round(float(linf.max()), 6) if n_att else 0.0,
            "attack_success_rate": round(100.0 * fooled / n_att, 4) if n_att else 0.0,
            "time_s": round(time.perf_counter() - start, 3),
        }
        if self.project == "final":
            # The reference attack's own perturbation size, before the one projection.
            self.report["mean_linf_unprojected"] = (
                round(float(raw_linf[attacked].mean()), 6) if n_att else 0.0
            )
        return x_adv

    def describe(self) -> dict:
        return {
            "name": self.name,
            "norm": self.threat.norm,
            "eps": self.threat.eps,
            "project": self.project,
            "iterations": self.iterations,
            "lr": self.lr,
            "margin": self.margin,
            "alpha": self.alpha,
            "lambda_lf": self.lambda_lf,
            "batch_size": self.batch_size,
            "feature_input_of": self.feature_input_of,
            "bn_mode": self.bn_mode,
        }


ATTACKS.register("ssa", schema=SSAConfig)(SSAH)
