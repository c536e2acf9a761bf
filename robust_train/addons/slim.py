"""SLIM, the Stochastic Loss Integration Method (docs/methods/slim.md).

While crafting each training batch, the attack ascends

    task_weight * L_task(f(x_adv)) + lambda * L_dict(f^l(x), f^l(x_adv))

where `L_task` is the base defense's own inner loss (CE for PGD-AT and MART, KL for TRADES), `l` is a
random intermediate layer, `L_dict` a random loss from a small dictionary (squared L2, squared cosine,
negative cosine) and `lambda ~ U(lam_low, lam_high)` a signed weight. SLIM acts on the inner maximization
only: the outer loss, the model and evaluation are those of the base defense.

Pipeline mapping:
- `attack_context` draws (layer, loss, lambda) once per attack call, from SLIM's own generator, so that
  switching SLIM on shifts neither the data order nor the attack's random starts.
- `required_layers` taps the candidate layers in the attack's one forward per step (and the shared outer
  forwards, where nothing reads them), so SLIM runs no forward of its own.
- `inner_objective` reads the clean features from `CleanReference` (computed once per batch, no grad, in
  the attack's BN mode) and the adversarial ones from the attack step's forward. Cost
  (docs/methods/slim.md#cost): one
  extra no-grad clean forward per batch for PGD-AT and MART (TRADES computes it anyway), no extra backward.
- `task_weight` scales only the base term; terms of add-ons listed after SLIM are added unscaled.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, cast

import torch
from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator
from torch import nn

from robust_train.addons.base import Addon, AddonConfig, AddonContext, divergence_guard
from robust_train.errors import ConfigError
from robust_train.models.features import resolve_layer
from robust_train.registry import ADDONS
from robust_train.schema import Number
from robust_train.step_types import CleanReference

# Offset of SLIM's generator seed from the run seed: a stream of its own, apart from the global generator
# (weight init, attack starts) and the trainer's data generator (run seed + 1_000_003).
SEED_OFFSET = 5_110_007

RESAMPLE_MODES = ("batch", "step", "sample")
GRANULARITIES = ("stage", "block")
MSE_REDUCTIONS = ("sum", "mean")
COS_MODES = ("flatten", "channel")
BUILTIN_LOSSES = ("mse", "ortho", "reverse")

# A dictionary term: (clean features, adversarial features) -> per-example loss of shape (B,).
DictLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- the loss dictionary
def _upcast(t: torch.Tensor) -> torch.Tensor:
    # Sums over tens of thousands of feature elements lose too much in 16-bit floats (autocast).
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def cosine(
    f_nat: torch.Tensor, f_adv: torch.Tensor, mode: str = "flatten", eps: float = 1e-8
) -> torch.Tensor:
    """Cosine similarity per example (B, 1) over the flattened feature, or per position over channels (B, P).

    Each norm is floored at `eps` (as `F.cosine_similarity`), via a clamp of the squared norm so that the
    gradient of an all-zero feature stays finite too.
    """
    a, b = _upcast(f_nat), _upcast(f_adv)
    if mode == "channel" and a.dim() > 2:
        a, b, dim = a.flatten(2), b.flatten(2), 1
    else:
        a, b, dim = a.flatten(1).unsqueeze(2), b.flatten(1).unsqueeze(2), 1
    dot = (a * b).sum(dim)
    na = a.pow(2).sum(dim).clamp_min(eps * eps).sqrt()
    nb = b.pow(2).sum(dim).clamp_min(eps * eps).sqrt()
    return dot / (na * nb)


def mse_loss(f_nat: torch.Tensor, f_adv: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """`||a - b||^2` per example (the seed's "MSE" is a squared norm: a sum); `mean` divides by the size."""
    d = (_upcast(f_nat) - _upcast(f_adv)).flatten(1).pow(2)
    return d.sum(1) if reduction == "sum" else d.mean(1)


def ortho_loss(
    f_nat: torch.Tensor, f_adv: torch.Tensor, mode: str = "flatten", eps: float = 1e-8
) -> torch.Tensor:
    """`c^2` per example (the "orthogonal" loss); averaged over positions in channel mode."""
    return cosine(f_nat, f_adv, mode, eps).pow(2).mean(1)


def reverse_loss(
    f_nat: torch.Tensor, f_adv: torch.Tensor, mode: str = "flatten", eps: float = 1e-8
) -> torch.Tensor:
    """`-c` per example (the "reverse" loss); averaged over positions in channel mode."""
    return -cosine(f_nat, f_adv, mode, eps).mean(1)


def _import_loss(spec: str) -> DictLoss:
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"dictionary loss {spec!r} cannot be imported ({err})") from None
    if not callable(fn):
        raise ConfigError(f"dictionary loss {spec!r} is not callable")
    return fn


def make_dict_loss(
    name: str, mse_reduction: str = "sum", cos_mode: str = "flatten", eps: float = 1e-8
) -> DictLoss:
    """The dictionary term called `name`: mse, ortho, reverse, or a custom "package.module:function"."""
    if name == "mse":
        return lambda a, b: mse_loss(a, b, mse_reduction)
    if name == "ortho":
        return lambda a, b: ortho_loss(a, b, cos_mode, eps)
    if name == "reverse":
        return lambda a, b: reverse_loss(a, b, cos_mode, eps)
    if isinstance(name, str) and ":" in name:
        return _import_loss(name)
    raise ConfigError(
        f"dictionary loss {name!r} is not known; allowed: {', '.join(BUILTIN_LOSSES)} "
        "or 'package.module:function'"
    )


# --------------------------------------------------------------------------- draws
@dataclass
class Draw:
    """One draw of SLIM's random choices: a term `weight * L_dict[loss](f^layer)` per (layer, loss).

    In batch and step mode there is one term with a float weight (lambda); in sample mode one term per
    (layer, loss) pair that some example drew, weighted by a (B,) vector holding lambda_i where example i
    drew that pair and 0 elsewhere.
    """

    terms: list[tuple[str, str, float | torch.Tensor]]
    # Per example (sample mode) or a single entry: what was drawn, on the host, for logs and tests.
    layers: list[str] = field(default_factory=list)
    losses: list[str] = field(default_factory=list)
    lams: list[float] = field(default_factory=list)

    @property
    def active(self) -> bool:
        """Whether any lambda is non-zero (decided on the host, from the draw itself)."""
        return any(lam != 0.0 for lam in self.lams)


# --------------------------------------------------------------------------- config
def _loss_problem(name: Any, key: str) -> str | None:
    """Why `name` is not a dictionary loss (None when it is one)."""
    if not isinstance(name, str) or (name not in BUILTIN_LOSSES and ":" not in name):
        return (
            f"addons.slim.{key} contains {name!r}; allowed: {', '.join(BUILTIN_LOSSES)} "
            "or 'package.module:function'"
        )
    if name not in BUILTIN_LOSSES:
        try:
            _import_loss(name)
        except ConfigError as err:
            return f"addons.slim.{key}: {err}"
    return None


def _losses(value: Any) -> Any:
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise ValueError("must be a non-empty list of loss names")
    names = list(value)
    problems = [msg for msg in (_loss_problem(n, "losses") for n in names) if msg]
    if len(set(map(str, names))) != len(names):
        problems.append(f"addons.slim.losses={names} lists a loss twice (selection is uniform over the list)")
    if problems:
        raise ValueError("; ".join(problems))
    return names


def _fixed_loss(value: Any) -> Any:
    problem = None if value is None else _loss_problem(value, "fixed_loss")
    if problem:
        raise ValueError(problem)
    return value


def _layer_list(value: Any) -> Any:
    if value is None:
        return value
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise ValueError("must be null or a non-empty list of layer names")
    names = list(value)
    if not all(isinstance(n, str) and n for n in names):
        raise ValueError("must hold layer names (non-empty strings)")
    if len(set(names)) != len(names):
        raise ValueError("lists a layer twice (selection is uniform over the list)")
    return names


def _layer_name(value: Any) -> Any:
    if value is not None and not (isinstance(value, str) and value):
        raise ValueError("must be null or a layer name")
    return value


class SLIMConfig(AddonConfig):
    """`addons.slim` (docs/methods/slim.md#presets). Strength zero (`fixed_lambda: 0`) is the base step."""

    # Candidate layers: the model's stage outputs (stage) or every residual-block output (block).
    granularity: Literal["stage", "block"] = "stage"
    # An explicit list of layer names instead of the granularity (null: use granularity).
    layers: Annotated[list[str] | None, BeforeValidator(_layer_list)] = None
    # The loss dictionary, drawn uniformly: mse (||a - b||^2), ortho (cos^2), reverse (-cos), or a
    # custom "package.module:function" mapping (f_clean, f_adv) to (B,).
    losses: Annotated[list[str], BeforeValidator(_losses)] = Field(
        default_factory=lambda: list(BUILTIN_LOSSES)
    )
    # lambda ~ U(lam_low, lam_high): signed, as in the paper.
    lam_low: Annotated[Number, divergence_guard(100.0)] = -1.0
    lam_high: Annotated[Number, divergence_guard(100.0)] = 1.0
    # When (layer, loss, lambda) is drawn: once per attack call (batch), at every attack step (step),
    # or per example once per attack call (sample).
    resample: Literal["batch", "step", "sample"] = "batch"
    # Per-example reduction of mse: sum (the paper's squared L2 norm) or mean.
    mse_reduction: Literal["sum", "mean"] = "sum"
    # Cosine over the flattened C*H*W feature (flatten), or over channels per position (channel).
    cos_mode: Literal["flatten", "channel"] = "flatten"
    # Floor of each feature norm inside the cosine, so all-zero features stay finite.
    cos_eps: Annotated[Number, Field(gt=0)] = 1e-8
    # Weight of the base defense's inner loss (CE for PGD-AT/MART, KL for TRADES).
    task_weight: Annotated[Number, Field(ge=0), divergence_guard(100.0)] = 1.0
    # Pin a choice instead of drawing it (null: random); task_weight 0, fixed_layer layer4,
    # fixed_loss reverse, fixed_lambda 1.0 is the paper's PGD-CS ablation (Table 1).
    fixed_layer: Annotated[str | None, AfterValidator(_layer_name)] = None
    fixed_loss: Annotated[str | None, BeforeValidator(_fixed_loss)] = None
    fixed_lambda: Annotated[Number | None, divergence_guard(100.0)] = None

    # A field validator (not a model one), so that it is reported together with other fields' problems.
    @field_validator("lam_high")
    @classmethod
    def _low_below_high(cls, high: float, info: ValidationInfo) -> float:
        low = info.data.get("lam_low")
        if low is not None and low > high:
            raise ValueError(
                f"addons.slim.lam_low={low:g} must be <= addons.slim.lam_high={high:g}; lambda ~ U(low, high)"
            )
        return high


def candidate_layers(
    model: nn.Module, granularity: str = "stage", layers: Sequence[str] | None = None
) -> list[str]:
    """The layers SLIM draws from: an explicit list, or the model's stage / block outputs.

    Every name is checked against the model (ConfigError naming the layer and the known ones).
    """
    base = getattr(model, "_orig_mod", model)
    if layers:
        names = [str(n) for n in layers]
    elif hasattr(base, "feature_layer_names"):
        names = list(cast(Any, base).feature_layer_names(granularity))
    else:
        raise ConfigError(
            f"model {type(base).__name__} declares no feature layers; set addons.slim.layers to a list of "
            "its submodule names"
        )
    if not names:
        arch = getattr(base, "arch", type(base).__name__)
        raise ConfigError(
            f"model '{arch}' has no {granularity} layers for SLIM; set addons.slim.layers explicitly"
        )
    for n in names:
        resolve_layer(model, n)
    return names


@ADDONS.register("slim", schema=SLIMConfig)
class SLIM(Addon):
    """Adds `lambda * L_dict(f^l(x), f^l(x_adv))` for a random layer, loss and lambda to the attack's loss."""

    name = "slim"
    # Standard training has no attack to modify.
    needs_adversarial = True
    supports_awp = True

    def __init__(self, cfg: Any, ctx: AddonContext) -> None:
        super().__init__(cfg, ctx)
        cfg = self.cfg
        problems = self.check_config(cfg, ctx.cfg)
        if problems:
            raise ConfigError("; ".join(problems))
        self.layers = candidate_layers(ctx.model, cfg.granularity, cfg.layers)
        self.fixed_layer: str | None = cfg.fixed_layer
        if self.fixed_layer is not None:
            resolve_layer(ctx.model, self.fixed_layer)
        self.loss_names = [str(n) for n in cfg.losses]
        self.fixed_loss: str | None = cfg.fixed_loss
        names = self.loss_names + ([self.fixed_loss] if self.fixed_loss is not None else [])
        self.losses: dict[str, DictLoss] = {
            n: make_dict_loss(n, cfg.mse_reduction, cfg.cos_mode, cfg.cos_eps) for n in names
        }
        self.lam_low = cfg.lam_low
        self.lam_high = cfg.lam_high
        self.fixed_lambda = cfg.fixed_lambda
        self.task_weight = cfg.task_weight
        self.resample = cfg.resample
        self.generator = torch.Generator().manual_seed(int(ctx.seed) + SEED_OFFSET)
        self.draws = 0  # draws of (layer, loss, lambda) so far, for logs
        self.last_draw: Draw | None = None
        self._current: Draw | None = None
        self._calls = 0

    # ----------------------------------------------------------------- config
    @classmethod
    def check_config(cls, cfg: Any, run_cfg: Any) -> list[str]:
        """Run-level rules (the node's own keys are the schema's; layer names are checked against the
        model when it is built)."""
        defense = run_cfg.get("defense") if run_cfg is not None and hasattr(run_cfg, "get") else None
        attack = defense.get("attack") if defense is not None and hasattr(defense, "get") else None
        if attack is not None and attack.get("random_start") == "none":
            # At x_adv = x every dictionary term has zero input gradient
            # (docs/methods/slim.md#random-start-required).
            return [
                "addons.slim needs a random attack start, but defense.attack.random_start=none; "
                "choose uniform or normal"
            ]
        return []

    # ----------------------------------------------------------------- draws
    def _sample(self, n: int) -> tuple[list[str], list[str], list[float]]:
        """n independent draws of (layer, loss, lambda) from SLIM's generator, fixed_* applied after.

        All three are always drawn, so pinning one choice does not shift the stream of the others.
        """
        g = self.generator
        li = torch.randint(len(self.layers), (n,), generator=g).tolist()
        ki = torch.randint(len(self.loss_names), (n,), generator=g).tolist()
        u = torch.rand((n,), generator=g, dtype=torch.float64)
        lams = (self.lam_low + (self.lam_high - self.lam_low) * u).tolist()
        self.draws += n
        layers = [self.fixed_layer or self.layers[i] for i in li]
        losses = [self.fixed_loss or self.loss_names[k] for k in ki]
        if self.fixed_lambda is not None:
            lams = [self.fixed_lambda] * n
        return layers, losses, lams

    def draw(self) -> Draw:
        """One (layer, loss, lambda) shared by the whole batch."""
        (layer,), (loss,), (lam,) = self._sample(1)
        return Draw(terms=[(layer, loss, lam)], layers=[layer], losses=[loss], lams=[lam])

    def draw_per_example(self, n: int, device: torch.device, dtype: torch.dtype) -> Draw:
        """Independent (layer_i, loss_i, lambda_i) per example, as one weighted term per drawn pair."""
        layers, losses, lams = self._sample(n)
        terms: list[tuple[str, str, float | torch.Tensor]] = []
        for pair in dict.fromkeys(zip(layers, losses)):
            w = [lam if (l_, k_) == pair else 0.0 for l_, k_, lam in zip(layers, losses, lams)]
            if any(v != 0.0 for v in w):
                terms.append((pair[0], pair[1], torch.tensor(w, dtype=dtype).to(device)))
        return Draw(terms=terms, layers=layers, losses=losses, lams=lams)

    # ----------------------------------------------------------------- hooks
    def required_layers(self) -> list[str]:
        return [self.fixed_layer] if self.fixed_layer is not None else list(self.layers)

    @contextmanager
    def attack_context(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
        """Draw once per attack call (sample mode: once per example per call)."""
        self._calls = 0
        if self.resample == "sample":
            self._current = self.draw_per_example(x.shape[0], x.device, x.dtype)
        else:
            self._current = self.draw()
        self.last_draw = self._current
        try:
            yield
        finally:
            self._current = None

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
        """`(task_weight - 1) * base_term + sum of lambda * L_dict`, so that the total is SLIM's L_adv."""
        if self._current is None:  # objective used outside the training step's attack context
            self._current = self.draw()
        elif self.resample == "step" and self._calls > 0:
            self._current = self.draw()
        self.last_draw = self._current
        self._calls += 1
        extra: torch.Tensor | None = None
        if self.task_weight != 1.0:
            extra = (self.task_weight - 1.0) * base_term
        if not self._current.active:
            return extra
        f_nat = clean.features(model)
        for layer, loss, weight in self._current.terms:
            term = weight * self.losses[loss](f_nat[layer], feats_adv[layer])
            extra = term if extra is None else extra + term
        return extra

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """SLIM's generator position, so that a resumed run continues the same sequence of draws."""
        return {"generator": self.generator.get_state(), "draws": self.draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("generator") is not None:
            self.generator.set_state(state["generator"].cpu())
        self.draws = int(state.get("draws", 0))
