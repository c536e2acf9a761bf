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
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robust_train.addons.base import Addon, AddonContext
from robust_train.config import to_float
from robust_train.errors import ConfigError
from robust_train.models.features import resolve_layer
from robust_train.training.forwards import CleanReference

# Offset of SLIM's generator seed from the run seed: a stream of its own, apart from the global generator
# (weight init, attack starts) and the trainer's data generator (run seed + 1_000_003).
SEED_OFFSET = 5_110_007

RESAMPLE_MODES = ("batch", "step", "sample")
GRANULARITIES = ("stage", "block")
MSE_REDUCTIONS = ("sum", "mean")
COS_MODES = ("flatten", "channel")
BUILTIN_LOSSES = ("mse", "ortho", "reverse")
CONFIG_KEYS = (
    "enabled", "granularity", "layers", "losses", "lam_low", "lam_high", "resample", "mse_reduction",
    "cos_mode", "cos_eps", "task_weight", "fixed_layer", "fixed_loss", "fixed_lambda",
)  # fmt: skip

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


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if cfg is not None and hasattr(cfg, "get") else default


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
        names = list(base.feature_layer_names(granularity))
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


class SLIM(Addon):
    """Adds `lambda * L_dict(f^l(x), f^l(x_adv))` for a random layer, loss and lambda to the attack's loss."""

    name = "slim"
    # Standard training has no attack to modify.
    supported_defenses = ("pgd_at", "trades", "mart")
    supports_awp = True

    def __init__(self, cfg: Any, ctx: AddonContext) -> None:
        super().__init__(cfg, ctx)
        problems = self.check_config(cfg, ctx.cfg)
        if problems:
            raise ConfigError("; ".join(problems))
        explicit = _cfg_get(cfg, "layers")
        self.layers = candidate_layers(ctx.model, str(_cfg_get(cfg, "granularity", "stage")), explicit)
        self.fixed_layer: str | None = _cfg_get(cfg, "fixed_layer")
        if self.fixed_layer is not None:
            resolve_layer(ctx.model, self.fixed_layer)
        self.loss_names = [str(n) for n in _cfg_get(cfg, "losses", BUILTIN_LOSSES)]
        self.fixed_loss: str | None = _cfg_get(cfg, "fixed_loss")
        mse_reduction = str(_cfg_get(cfg, "mse_reduction", "sum"))
        cos_mode = str(_cfg_get(cfg, "cos_mode", "flatten"))
        eps = to_float(_cfg_get(cfg, "cos_eps", 1e-8), "addons.slim.cos_eps")
        names = self.loss_names + ([self.fixed_loss] if self.fixed_loss is not None else [])
        self.losses: dict[str, DictLoss] = {n: make_dict_loss(n, mse_reduction, cos_mode, eps) for n in names}
        self.lam_low = to_float(_cfg_get(cfg, "lam_low", -1.0), "addons.slim.lam_low")
        self.lam_high = to_float(_cfg_get(cfg, "lam_high", 1.0), "addons.slim.lam_high")
        fixed = _cfg_get(cfg, "fixed_lambda")
        self.fixed_lambda = None if fixed is None else to_float(fixed, "addons.slim.fixed_lambda")
        self.task_weight = to_float(_cfg_get(cfg, "task_weight", 1.0), "addons.slim.task_weight")
        self.resample = str(_cfg_get(cfg, "resample", "batch"))
        self.generator = torch.Generator().manual_seed(int(ctx.seed) + SEED_OFFSET)
        self.draws = 0  # draws of (layer, loss, lambda) so far, for logs
        self.last_draw: Draw | None = None
        self._current: Draw | None = None
        self._calls = 0

    # ----------------------------------------------------------------- config
    @classmethod
    def check_config(cls, cfg: Any, run_cfg: Any) -> list[str]:
        """Problems with `addons.slim.*` (layer names are checked against the model when it is built)."""
        p: list[str] = []
        if cfg is None:
            return p
        if hasattr(cfg, "keys"):
            for key in cfg.keys():
                if key not in CONFIG_KEYS:
                    p.append(f"addons.slim.{key} is not an option of SLIM; known: {', '.join(CONFIG_KEYS)}")

        def choice(key: str, allowed: tuple[str, ...], default: str) -> None:
            value = _cfg_get(cfg, key, default)
            if value not in allowed:
                p.append(f"addons.slim.{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")

        def number(key: str, default: Any, lo: float | None = None, lo_open: bool = False) -> float | None:
            value = _cfg_get(cfg, key, default)
            if value is None:
                return None
            try:
                x = to_float(value, f"addons.slim.{key}")
            except ConfigError as err:
                p.append(str(err))
                return None
            bound = "" if lo is None else f" ({lo:g} {'<' if lo_open else '<='} value)"
            if not math.isfinite(x) or (lo is not None and (x < lo or (lo_open and x == lo))):
                p.append(f"addons.slim.{key}={value!r} is out of range: allowed a finite number{bound}")
                return None
            return x

        choice("granularity", GRANULARITIES, "stage")
        choice("resample", RESAMPLE_MODES, "batch")
        choice("mse_reduction", MSE_REDUCTIONS, "sum")
        choice("cos_mode", COS_MODES, "flatten")
        number("task_weight", 1.0, lo=0.0)
        number("cos_eps", 1e-8, lo=0.0, lo_open=True)
        number("fixed_lambda", None)
        low, high = number("lam_low", -1.0), number("lam_high", 1.0)
        if low is not None and high is not None and low > high:
            p.append(
                f"addons.slim.lam_low={low:g} must be <= addons.slim.lam_high={high:g}; lambda ~ U(low, high)"
            )

        def loss_ok(name: Any, key: str) -> None:
            if not isinstance(name, str) or (name not in BUILTIN_LOSSES and ":" not in name):
                p.append(
                    f"addons.slim.{key} contains {name!r}; allowed: {', '.join(BUILTIN_LOSSES)} "
                    "or 'package.module:function'"
                )
            elif name not in BUILTIN_LOSSES:
                try:
                    _import_loss(name)
                except ConfigError as err:
                    p.append(f"addons.slim.{key}: {err}")

        losses = _cfg_get(cfg, "losses", list(BUILTIN_LOSSES))
        if isinstance(losses, str) or not losses or not hasattr(losses, "__iter__"):
            p.append(f"addons.slim.losses={losses!r} must be a non-empty list of loss names")
        else:
            names = list(losses)
            for name in names:
                loss_ok(name, "losses")
            if len(set(map(str, names))) != len(names):
                p.append(
                    f"addons.slim.losses={names} lists a loss twice (selection is uniform over the list)"
                )
        if _cfg_get(cfg, "fixed_loss") is not None:
            loss_ok(_cfg_get(cfg, "fixed_loss"), "fixed_loss")

        layers = _cfg_get(cfg, "layers")
        if layers is not None:
            if isinstance(layers, str) or not hasattr(layers, "__iter__") or not list(layers):
                p.append(f"addons.slim.layers={layers!r} must be null or a non-empty list of layer names")
            else:
                names = list(layers)
                if not all(isinstance(n, str) and n for n in names):
                    p.append(f"addons.slim.layers={names} must hold layer names (non-empty strings)")
                elif len(set(names)) != len(names):
                    p.append(
                        f"addons.slim.layers={names} lists a layer twice (selection is uniform over the list)"
                    )
        fixed_layer = _cfg_get(cfg, "fixed_layer")
        if fixed_layer is not None and not (isinstance(fixed_layer, str) and fixed_layer):
            p.append(f"addons.slim.fixed_layer={fixed_layer!r} must be null or a layer name")

        attack = _cfg_get(_cfg_get(run_cfg, "defense"), "attack")
        if _cfg_get(attack, "random_start") == "none":
            # At x_adv = x every dictionary term has zero input gradient
            # (docs/methods/slim.md#random-start-required).
            p.append(
                "addons.slim needs a random attack start, but defense.attack.random_start=none; "
                "choose uniform or normal"
            )
        return p

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
