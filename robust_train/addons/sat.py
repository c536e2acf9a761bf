"""SAT: Sufficient Adversarial Training (ICCV 2023), docs/methods/sat.md.

Two contributions to the host defense's step:

* inner maximization (docs/methods/sat.md#inner-objective): the attack ascends the host's inner loss minus Λ
  times the feature shift
  at the tapped layers, ||f^l(x + r) - f^l(x)||, with Λ ~ U(0, λ) redrawn at every attack step (default);
* outer minimization (docs/methods/sat.md#cluster-loss): beta * L_clu, the within-class spread of the tapped
  features of the
  adversarial batch around in-batch class centroids.

Both read the layers declared by `required_layers` from the step's shared forwards (the attack's forward
per step, the clean reference and the outer forwards), so SAT adds no forward or backward pass to the host
step, except the clean reference's one no-grad forward for hosts that do not already need it (PGD-AT, MART;
docs/methods/sat.md#cost makes the same clean forward). The attack itself is the host's (steps, step size,
start, restarts and BN mode are the host's `defense.attack.*` keys), except that `init: code_gaussian`
replaces its start by the authors' code's (docs/methods/sat.md#attack-start). AWP composes as in
docs/methods/sat.md#composition: the host's AWP is entered
before SAT's outer loss, and its ascent sees the host loss only.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BeforeValidator, Field, model_validator
from torch import nn

from robust_train.addons.base import Addon, AddonConfig, AddonContext, divergence_guard
from robust_train.attacks import ThreatModel
from robust_train.errors import ConfigError
from robust_train.models.features import resolve_layer
from robust_train.registry import ADDONS
from robust_train.schema import Flag, Integer, Number
from robust_train.step_types import CleanReference, StepForwards, StepLoss

LAM_SAMPLINGS = ("per_step_batch", "per_batch_fixed", "per_sample_fixed")
SHIFT_REDUCTIONS = ("batch_frobenius", "per_sample")
CLUSTER_FORMS = ("code", "paper", "l2dist")
CLUSTER_INPUTS = ("adv", "clean", "both")
INITS = ("host", "code_gaussian")

# Inside square roots: finite gradients at zero shift / zero variance (docs/methods/sat.md#numerical-guards).
ROOT_EPS = 1e-12
# SAT's Λ generator is seeded from the run seed plus this offset, so switching SAT on does not shift the
# global stream (data order, attack starts, weight init).
SEED_OFFSET = 0x5A7


def _root(x: torch.Tensor) -> torch.Tensor:
    """sqrt(x + eps) - sqrt(eps): finite gradient at 0 and exactly 0 there (a constant shift of the loss)."""
    return torch.sqrt(x + ROOT_EPS) - math.sqrt(ROOT_EPS)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Flattened per-sample features; half precision widened to float32 (norms of thousands of dims)."""
    t = t.flatten(1)
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def feature_shift(
    feats: Sequence[torch.Tensor], refs: Sequence[torch.Tensor], reduction: str = "batch_frobenius"
) -> torch.Tensor:
    """Feature shift averaged over taps: one Frobenius norm per tap (scalar) or per-sample L2 norms (B,)."""
    if reduction not in SHIFT_REDUCTIONS:
        raise ConfigError(f"shift_reduction={reduction!r} is not allowed; choose one of: {SHIFT_REDUCTIONS}")
    total: torch.Tensor | None = None
    for f, r in zip(feats, refs, strict=True):
        d = _wide(f) - _wide(r)
        sq = (d * d).sum() if reduction == "batch_frobenius" else (d * d).sum(dim=1)
        term = _root(sq)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("feature_shift needs at least one tapped layer")
    return total / len(feats)


def cluster_loss(
    feats: Sequence[torch.Tensor],
    y: torch.Tensor,
    num_classes: int,
    form: str = "code",
    min_class_count: int = 2,
) -> torch.Tensor:
    """L_clu (docs/methods/sat.md#cluster-loss) averaged over taps, from in-batch class centroids; small
    classes are skipped.

    code:   sum_c n_c * ||unbiased per-dim variance of class c||_2 / (samples in counted classes)
    paper:  mean over counted classes of sum_k std_k (biased variance)
    l2dist: mean over counted classes of the mean L2 distance to the class centroid
    Vectorized over classes with a one-hot matrix: no host synchronization, no data-dependent shapes.
    """
    if form not in CLUSTER_FORMS:
        raise ConfigError(f"cluster_form={form!r} is not allowed; choose one of: {', '.join(CLUSTER_FORMS)}")
    total: torch.Tensor | None = None
    with torch.autocast(device_type=y.device.type, enabled=False):
        for raw in feats:
            f = _wide(raw)
            onehot = F.one_hot(y, num_classes).to(f.dtype)  # (B, C)
            counts = onehot.sum(0)  # (C,)
            counted = (counts >= min_class_count).to(f.dtype)
            # Centroids are not detached: the gradient flows through the batch statistics
            # (docs/methods/sat.md#cluster-loss).
            centroids = (onehot.t() @ f) / counts.clamp(min=1).unsqueeze(1)
            diff = f - centroids[y]
            if form == "l2dist":
                dist = _root((diff * diff).sum(dim=1))  # (B,)
                per_class = (onehot.t() @ dist) / counts.clamp(min=1)
                term = (counted * per_class).sum() / counted.sum().clamp(min=1)
            else:
                sq = onehot.t() @ (diff * diff)  # (C, d): per-class sums of squared deviations
                if form == "code":
                    var = sq / (counts - 1).clamp(min=1).unsqueeze(1)
                    norms = _root((var * var).sum(dim=1))
                    weight = counted * counts
                    term = (weight * norms).sum() / weight.sum().clamp(min=1)
                else:
                    var = sq / counts.clamp(min=1).unsqueeze(1)
                    stds = _root(var).sum(dim=1)
                    term = (counted * stds).sum() / counted.sum().clamp(min=1)
            total = term if total is None else total + term
    if total is None:
        raise ValueError("cluster_loss needs at least one tapped layer")
    return total / len(feats)


@dataclass(frozen=True)
class CodeGaussianStart(ThreatModel):
    """The threat model with the SAT code's random start (docs/methods/sat.md#attack-start), for L-inf only.

    delta0 = eps * (2 * N(0, I) - 1), then x + delta0 clipped to [0, 1] and *not* projected onto the eps-ball:
    per pixel the start has mean -eps and std 2*eps, so about 2/3 of the pixels start outside the ball (half
    of all pixels below -eps). The first attack step projects it, as the code does.
    The host's `random_start` kind is ignored; the draw uses the attack's generator like the host starts.
    """

    def random_init(
        self, x: torch.Tensor, kind: str = "uniform", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return self.box(self.eps * (2 * noise - 1), x)


def default_taps(model: nn.Module) -> list[str]:
    """`layers: auto`: the last two residual blocks of the model's last stage
    (docs/methods/sat.md#tapped-features)."""
    base = getattr(model, "_orig_mod", model)
    stages = list(getattr(base, "feature_layers", []))
    blocks = list(getattr(base, "block_layers", []))
    if not stages or not blocks:
        raise ConfigError(
            f"addons.sat.layers=auto needs a model that declares its stages and blocks; model "
            f"{type(base).__name__!r} does not, so list the layers explicitly (addons.sat.layers=[...])"
        )
    last = [b for b in blocks if b.startswith(stages[-1] + ".")] or blocks
    return last[-2:]


def _layers(value: Any) -> Any:
    if value == "auto":
        return value
    if (
        isinstance(value, str)
        or not isinstance(value, list | tuple)
        or len(value) == 0
        or not all(isinstance(n, str) and n for n in value)
    ):
        raise ValueError(
            "is not allowed: write auto or a non-empty list of layer names, e.g. [layer4.0,layer4.1]"
        )
    return list(value)


def _no_awp_cluster(value: bool) -> bool:
    if value:
        raise ValueError(
            "addons.sat.awp_include_cluster=true is not supported: the step's AWP ascent sees only the "
            "base defense's loss; allowed: false"
        )
    return value


class SATConfig(AddonConfig):
    """`addons.sat` (docs/methods/sat.md#presets)."""

    # Start of the training attack: host (the host's defense.attack.random_start) or code_gaussian (the
    # authors' code: x + eps * (2 * N(0, 1) - 1) clipped to [0, 1] but not to the eps-ball; L-inf only,
    # needs defense.attack.steps >= 1). A config saved before the key existed means host.
    init: Literal["host", "code_gaussian"] = "host"
    # Tapped layers (feature shift and L_clu): auto = the last two residual blocks of the last stage,
    # or a list of names from the model's block_layers / feature_layers.
    layers: Annotated[str | list[str], BeforeValidator(_layers)] = "auto"
    # Upper bound of Lambda ~ U(0, lambda) weighting the feature shift in the attack (0 = the host
    # attack). 0.087 is the code's value for batch_frobenius; ~0.087 * sqrt(batch) with per_sample.
    lam: Annotated[Number, Field(ge=0), divergence_guard(100.0)] = 0.087
    # per_step_batch (a new scalar at every attack step, the code) | per_batch_fixed | per_sample_fixed.
    lam_sampling: Literal["per_step_batch", "per_batch_fixed", "per_sample_fixed"] = "per_step_batch"
    # batch_frobenius (one Frobenius norm per tap, the code) | per_sample (the paper's Eq. 9).
    shift_reduction: Literal["batch_frobenius", "per_sample"] = "batch_frobenius"
    # Weight of the clustering regularizer L_clu in the outer loss (0 = the host loss exactly).
    beta: Annotated[Number, Field(ge=0), divergence_guard(100.0)] = 0.1
    # code (L2 norm of the unbiased class variance, frequency-weighted) | paper | l2dist.
    cluster_form: Literal["code", "paper", "l2dist"] = "code"
    # Features entering L_clu: adv (the code) | clean | both (clean/both add a clean forward for PGD-AT).
    cluster_inputs: Literal["adv", "clean", "both"] = "adv"
    # Classes with fewer samples in the batch are left out of L_clu (a variance needs two).
    min_class_count: Annotated[Integer, Field(ge=2)] = 2
    # Include beta*L_clu in the AWP ascent loss (SAT-AWP-AT): only false is supported.
    awp_include_cluster: Annotated[Flag, AfterValidator(_no_awp_cluster)] = False

    @model_validator(mode="after")
    def _per_sample_lambda_needs_per_sample_shift(self) -> SATConfig:
        if self.lam_sampling == "per_sample_fixed" and self.shift_reduction == "batch_frobenius":
            raise ValueError(
                "addons.sat.lam_sampling=per_sample_fixed needs addons.sat.shift_reduction=per_sample: "
                "a batch Frobenius shift has no per-sample term to weight"
            )
        return self


def _code_gaussian_problems(run_cfg: Any) -> list[str]:
    """`init: code_gaussian` is the code's L-inf start and is only projected by a first attack step."""
    problems: list[str] = []
    if run_cfg is None:
        return problems
    threat = run_cfg.get("threat") or {}
    attack = (run_cfg.get("defense") or {}).get("attack") or {}
    norm = attack.get("norm") or threat.get("norm")
    if norm is not None and norm != "linf":
        problems.append(
            f"addons.sat.init=code_gaussian is the authors' L-inf start; threat.norm={norm!r} needs "
            "addons.sat.init=host"
        )
    steps = attack.get("steps")
    if isinstance(steps, int) and not isinstance(steps, bool) and steps < 1:
        problems.append(
            f"addons.sat.init=code_gaussian needs defense.attack.steps >= 1 (got {steps}): its start lies "
            "outside the eps-ball until the first step projects it"
        )
    return problems


@ADDONS.register("sat", schema=SATConfig)
class SAT(Addon):
    """Generalized inner maximization (host loss - Λ·feature shift) plus beta·L_clu in the outer loss."""

    name = "sat"
    # A clean-only defense has no inner maximization and no adversarial features to cluster.
    needs_adversarial = True
    supports_awp = True

    def __init__(self, cfg: Any, ctx: AddonContext) -> None:
        super().__init__(cfg, ctx)
        cfg = self.cfg
        self.lam = cfg.lam
        self.beta = cfg.beta
        self.lam_sampling = cfg.lam_sampling
        self.shift_reduction = cfg.shift_reduction
        self.cluster_form = cfg.cluster_form
        self.cluster_inputs = cfg.cluster_inputs
        self.min_class_count = cfg.min_class_count
        self.init = cfg.init
        attack = getattr(ctx.defense, "attack", None)
        if self.init == "code_gaussian" and not isinstance(getattr(attack, "threat", None), ThreatModel):
            raise ConfigError(
                "addons.sat.init=code_gaussian needs a training attack that draws its start from a threat "
                f"model (pgd, cw, fgsm); defense.attack is {type(attack).__name__}"
            )
        self.num_classes = int(ctx.num_classes)
        layers = cfg.layers
        self.layers = default_taps(ctx.model) if layers == "auto" else [str(n) for n in layers]
        for name in self.layers:
            resolve_layer(ctx.model, name)  # ConfigError naming the layer and the known ones
        self.generator = torch.Generator()
        self.generator.manual_seed(int(ctx.seed) + SEED_OFFSET)
        # Λ of the batch being attacked: fixed per batch in the *_fixed modes, else drawn per step.
        self._batch_lam: float | torch.Tensor | None = None
        # The Λ values used for the current batch, in order (diagnostics and tests; never read in the step).
        self.drawn: list[float | torch.Tensor] = []

    @classmethod
    def check_config(cls, cfg: Any, run_cfg: Any) -> list[str]:
        return _code_gaussian_problems(run_cfg) if cfg is not None and cfg.init == "code_gaussian" else []

    def required_layers(self) -> list[str]:
        return list(self.layers)

    # ----------------------------------------------------------------- Λ sampling
    def _uniform(self, n: int | None) -> float | torch.Tensor:
        """U(0, 1) from SAT's own CPU generator: a float (n None) or a (n,) tensor."""
        if n is None:
            return float(torch.rand((), generator=self.generator, dtype=torch.float64))
        return torch.rand(n, generator=self.generator, dtype=torch.float64)

    def _draw(self, batch: int) -> float | torch.Tensor:
        u = self._uniform(batch if self.lam_sampling == "per_sample_fixed" else None)
        lam = self.lam * u
        self.drawn.append(lam)
        return lam

    def _step_lambda(self, batch: int) -> float | torch.Tensor:
        if self.lam_sampling == "per_step_batch":
            return self._draw(batch)
        if self._batch_lam is None:
            self._batch_lam = self._draw(batch)
        return self._batch_lam

    @contextmanager
    def attack_context(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
        # A new batch: the *_fixed modes draw a fresh Λ for it on first use.
        self._batch_lam = None
        self.drawn = []
        # Any: the start swaps the threat of a threat-model attack (checked when SAT is built).
        attack: Any = self.ctx.defense.attack
        if self.init != "code_gaussian" or attack is None:
            yield
            return
        # Built from the attack's current threat, so an eps already changed by an earlier add-on's
        # context (ISEAT's warm start) is kept; an add-on entered after SAT that swaps the threat itself
        # would drop this start.
        threat = attack.threat
        attack.threat = CodeGaussianStart(threat.norm, threat.eps)
        try:
            yield
        finally:
            attack.threat = threat

    # ----------------------------------------------------------------- hooks
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
        if self.lam == 0:
            return None
        ref = clean.features(model)
        shift = feature_shift(
            [feats_adv[n] for n in self.layers], [ref[n] for n in self.layers], self.shift_reduction
        )
        lam = self._step_lambda(x_adv.shape[0])
        if isinstance(lam, torch.Tensor) and (lam.device, lam.dtype) != (shift.device, shift.dtype):
            # One copy per batch: the fixed per-sample draw is reused by every attack step.
            lam = lam.to(device=shift.device, dtype=shift.dtype, non_blocking=True)
            self._batch_lam = lam
        term = -lam * shift
        if self.shift_reduction == "batch_frobenius":
            # The attack sums the per-example objective, so giving every example the whole-batch term
            # makes the batch objective B * (mean host loss - Λ·shift): the code's J up to the factor B.
            term = term.expand(x_adv.shape[0])
        return term

    def outer_loss(self, out: StepForwards, base: StepLoss) -> dict[str, Any]:
        if self.beta == 0:
            return {}
        branches = {"adv": ["adv"], "clean": ["clean"], "both": ["adv", "clean"]}[self.cluster_inputs]
        feats = [torch.cat([_wide(out.features(b)[n]) for b in branches]) for n in self.layers]
        y = out.y.repeat(len(branches))
        loss = cluster_loss(feats, y, self.num_classes, self.cluster_form, self.min_class_count)
        return {"cluster": self.beta * loss}

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"].to("cpu"))
