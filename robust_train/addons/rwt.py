"""RWT: randomized-weight Taylor adversarial training (Jin et al., CVPR 2023), docs/methods/rwt.md.

Two parts, each in its own stage of the step (docs/extending.md):

* attack context: one Gaussian draw u ~ N(0, sigma^2) per minibatch is added to the noise-scope tensors
  (all Conv2d kernels by default) while the training attack runs; the exact original tensors are copied
  back afterwards, so the outer step sees w (or w + v under AWP) bit for bit.
* outer loss: the first- and second-order Taylor surrogates of the released code
  (docs/methods/rwt.md#surrogate). From the
  shared clean and adversarial forwards, the row sums of the gradient of the batch-mean CE w.r.t. the
  final linear weight are computed in closed form from the logits and the final layer's input,
  r_j = mean_b (p_bj - [y_b = j]) * sum_i h_bi; the gaps |r_nat| - |r_adv| and r_adv^2 - r_nat^2 become soft
  targets T(.)[y] (an adaptive label smoothing) fitted with KL terms, and the base's label term is
  scaled by (1 - eta) (declared as `Reweight("label", -eta)`, which adds -eta * label term).

The final layer's input is read by a forward pre-hook installed through `forward_context`, i.e. during
the step's shared outer forwards, and handed to the outer loss in that forwards object's `state`: no
extra forward for TRADES, MART and their AWP variants. PGD-AT has no clean forward of its own; RWT asks
`StepForwards` for it (+1 forward, docs/methods/rwt.md#cost).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Annotated, Any, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import BeforeValidator, Field, model_validator
from torch import nn
from torch.func import functional_call

from robust_train.addons.base import Addon, AddonConfig, AddonContext, divergence_guard
from robust_train.defenses.awp import offset_weights
from robust_train.defenses.losses import kl_clean_adv
from robust_train.errors import ConfigError
from robust_train.models.features import resolve_layer
from robust_train.registry import ADDONS
from robust_train.schema import Flag, Integer, Number, to_float
from robust_train.step_types import LABEL, Reweight, StepForwards, StepLoss

NOISE_SCOPES = ("conv", "all_weights", "none")
SECOND_TARGETS = ("reference", "symmetric")
IMPLS = ("efficient", "reference")
VARIANTS = ("surrogate", "fd_literal")
# Offset of the noise generator's seed from the run seed: its draws never shift the data order,
# the attack starts or any other add-on's stream.
NOISE_SEED_OFFSET = 4_000_037


# --------------------------------------------------------------------------- closed-form pieces
def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Statistics in at least fp32 even when the forwards ran under bf16 autocast.
    return torch.promote_types(t.dtype, torch.float32)


def rowsum_gradient(logits: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row sums of d CE_mean(logits, y) / d W for the final linear `logits = h W^T + b`; shape (C,).

    Closed form of `W.grad.sum(1)` after a backward of the batch-mean CE (docs/methods/rwt.md#row-sums).
    """
    dt = _compute_dtype(logits)
    p = torch.softmax(logits.to(dt), dim=1)
    onehot = F.one_hot(y, logits.shape[1]).to(dt)
    return ((p - onehot) * h.flatten(1).to(dt).sum(1, keepdim=True)).mean(0)


def offlabel_mass(value: Any, num_classes: int) -> float:
    """c of T(.): `auto` -> 1 - 2/C (the code's 0.8 for C=10 and 0.98 for C=100), else the number."""
    if value is None or value == "auto":
        return 1.0 - 2.0 / num_classes
    return to_float(value, "addons.rwt.offlabel_mass")


def soft_target_matrix(d: torch.Tensor, c: float) -> torch.Tensor:
    """T(d) of docs/methods/rwt.md#target-matrix: row i keeps 1 - c on class i and spreads c over the others
    in proportion to
    p = (d - min d) / sum(d - min d). Degenerate rows (nothing to spread) fall back to uniform c / (C - 1).
    """
    n = d.shape[0]
    eye = torch.eye(n, dtype=d.dtype, device=d.device)
    p = d - d.min()
    total = p.sum()
    # where() on the denominators, not on the result: no NaN is ever formed, and no host sync.
    p = p / torch.where(total > 0, total, torch.ones_like(total))
    off = p.unsqueeze(0) * (1 - eye)
    rows = off.sum(1, keepdim=True)
    spread = c * off / torch.where(rows > 0, rows, torch.ones_like(rows))
    uniform = torch.full_like(off, c / max(n - 1, 1))
    return torch.where(rows > 0, spread, uniform) * (1 - eye) + (1 - c) * eye


def kl_soft(t: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(t || softmax(logits)), with 0 log 0 = 0."""
    log_q = F.log_softmax(logits.to(_compute_dtype(logits)), dim=1)
    return (torch.xlogy(t, t) - t * log_q).sum(1).mean()


def taylor_targets(
    r_nat: torch.Tensor, r_adv: torch.Tensor, y: torch.Tensor, c: float, second_target: str = "reference"
) -> dict[str, torch.Tensor]:
    """Per-example soft targets (B, C) of the first- and second-order terms
    (docs/methods/rwt.md#soft-targets)."""
    a_n, a_a = r_nat.abs(), r_adv.abs()
    q_n, q_a = r_nat * r_nat, r_adv * r_adv  # Hadamard product, as the released code
    t2 = soft_target_matrix(q_a - q_n, c)
    t2_adv = t2 if second_target == "reference" else soft_target_matrix(q_n - q_a, c)
    return {
        "first_adv": soft_target_matrix(a_n - a_a, c)[y],
        "first_nat": soft_target_matrix(a_a - a_n, c)[y],
        "second_adv": t2_adv[y],
        "second_nat": t2[y],
    }


def surrogate_terms(
    z_nat: torch.Tensor, z_adv: torch.Tensor, targets: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) = 1/2 [KLsoft(t_adv, z_adv) + KLsoft(t_nat, z_nat)] for each order."""
    first = 0.5 * (kl_soft(targets["first_adv"], z_adv) + kl_soft(targets["first_nat"], z_nat))
    second = 0.5 * (kl_soft(targets["second_adv"], z_adv) + kl_soft(targets["second_nat"], z_nat))
    return first, second


def final_linear_name(model: nn.Module, name: str = "auto") -> str:
    """The final linear layer's name: the model's `fc` (or else its last nn.Linear) for `auto`."""
    base = getattr(model, "_orig_mod", model)
    if name != "auto":
        module = resolve_layer(model, name)
        if not isinstance(module, nn.Linear):
            raise ConfigError(
                f"addons.rwt.final_layer={name!r} is a {type(module).__name__}, not an nn.Linear; "
                "name the model's final linear layer (or auto)"
            )
        return name
    if isinstance(getattr(base, "fc", None), nn.Linear):
        return "fc"
    linears = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"addons.rwt.final_layer=auto: model '{getattr(base, 'arch', type(base).__name__)}' has no "
            "nn.Linear layer; RWT's surrogate needs a final linear layer"
        )
    return linears[-1]


def noise_parameter_names(model: nn.Module, scope: str) -> list[str]:
    """Parameters the attack-time noise perturbs: Conv2d kernels (`conv`), or every tensor with ndim > 1."""
    if scope == "none":
        return []
    if scope == "all_weights":
        return [n for n, p in model.named_parameters() if p.dim() > 1]
    return [
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]


# --------------------------------------------------------------------------- config
def _offlabel_mass(value: Any) -> Any:
    if value == "auto":
        return value
    try:
        x = to_float(value, "offlabel_mass")
    except ConfigError:
        raise ValueError("is not a number; write e.g. 0.8 or auto (= 1 - 2/num_classes)") from None
    if not 0.0 <= x <= 1.0:
        raise ValueError("is out of range: allowed 0 <= value <= 1 (or auto = 1 - 2/num_classes)")
    return x


def _layer_name(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        raise ValueError("must be auto or a module name such as fc")
    return value


class RWTConfig(AddonConfig):
    """`addons.rwt` (docs/methods/rwt.md#presets)."""

    # Taylor order: 0 = the base method only (no outer terms), 1 = + first-order term, 2 = + both.
    order: Annotated[Integer, Field(ge=0, le=2)] = 2
    # Weight of the first-order term (and, times second_coef, of the second); 0 = the base method.
    # Paper's best: 0.2 for order 2, 0.3 for order 1.
    eta: Annotated[Number, Field(ge=0, le=1)] = 0.2
    # Second-order weight = second_coef * eta (0.5 as in the WRN/AWP scripts; 0.2 in train_res18_our.py).
    second_coef: Annotated[Number, Field(ge=0), divergence_guard(100.0)] = 0.5
    # Scale the base method's label term by (1 - eta), as the released code does for TRADES.
    scale_base_ce: Flag = True
    # Std of the attack-time weight noise u (one draw per minibatch, RWT's own generator); the paper
    # quotes 0.01 ("variance"), the code uses 1e-4. 0 disables the noise and its draw.
    noise_std: Annotated[Number, Field(ge=0), divergence_guard(1.0)] = 1e-4
    # conv = every nn.Conv2d kernel (incl. 1x1 shortcuts) | all_weights (ndim > 1) | none.
    noise_scope: Literal["conv", "all_weights", "none"] = "conv"
    # Apply u while the training attack runs (the only place the paper uses it).
    noise_in_attack: Flag = True
    # Off-label mass c of the soft targets: auto = 1 - 2/C (the code's 0.8 / 0.98), or a number in [0, 1].
    offlabel_mass: Annotated[float | str, BeforeValidator(_offlabel_mass)] = "auto"
    # Second-order target pairing: reference (released code) | symmetric (Eq. 19).
    second_target: Literal["reference", "symmetric"] = "reference"
    # The final linear layer whose weight gradient drives the targets: auto (the model's fc) or a name.
    final_layer: Annotated[str, BeforeValidator(_layer_name)] = "auto"
    # efficient (closed-form row sums from the shared forwards) | reference (the authors' route).
    impl: Literal["efficient", "reference"] = "efficient"
    # surrogate (the released code's terms) | fd_literal (central differences along u, +4 forwards).
    variant: Literal["surrogate", "fd_literal"] = "surrogate"

    @model_validator(mode="after")
    def _fd_literal_needs_noise(self) -> RWTConfig:
        problems = []
        if self.variant == "fd_literal":
            if self.impl == "reference":
                problems.append(
                    "addons.rwt.impl=reference applies to variant=surrogate only; "
                    "use impl=efficient with variant=fd_literal"
                )
            if self.noise_std == 0 or self.noise_scope == "none":
                problems.append(
                    "addons.rwt.variant=fd_literal differentiates along the drawn u: it needs "
                    "addons.rwt.noise_std > 0 and addons.rwt.noise_scope in (conv, all_weights)"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self


# --------------------------------------------------------------------------- the add-on
@ADDONS.register("rwt", schema=RWTConfig)
class RWT(Addon):
    """Gaussian weight noise in the attack plus the Taylor surrogate terms in the outer loss."""

    name = "rwt"
    # Standard training crafts no x_adv: there is neither an attack to randomize nor an adversarial gap.
    needs_adversarial = True
    # The noise lives only inside the attack, so it never meets another weight perturbation (AWP's v
    # is applied after the attack; RWT's targets are then taken at w + v, docs/methods/rwt.md#composition).
    supports_awp = True
    conflicts_with = ()

    def __init__(self, cfg: Any, ctx: AddonContext) -> None:
        super().__init__(cfg, ctx)
        cfg = self.cfg
        self.order = cfg.order
        self.eta = cfg.eta
        self.second_coef = cfg.second_coef
        self.scale_base_ce = cfg.scale_base_ce
        self.noise_std = cfg.noise_std
        self.noise_scope = cfg.noise_scope
        self.noise_in_attack = cfg.noise_in_attack
        self.c = offlabel_mass(cfg.offlabel_mass, int(ctx.num_classes))
        self.second_target = cfg.second_target
        self.impl = cfg.impl
        self.variant = cfg.variant
        # Resolved now so that a wrong name fails at build time, naming the known layers.
        self.final_layer = final_linear_name(ctx.model, cfg.final_layer)
        self.generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        # This minibatch's draw u (name -> tensor), kept only when the fd_literal variant needs it.
        self._u: dict[str, torch.Tensor] = {}
        # model -> its noise-scope parameter names (computed once per model, not per step).
        self._noise_names: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()

    # ----------------------------------------------------------------- state
    @property
    def outer_active(self) -> bool:
        """Whether the outer loss changes at all (order 0 or eta 0: the base method exactly)."""
        return self.order > 0 and self.eta > 0

    def _draws_noise(self) -> bool:
        if self.noise_std <= 0 or self.noise_scope == "none":
            return False
        return self.noise_in_attack or (self.variant == "fd_literal" and self.outer_active)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(self.ctx.seed) + NOISE_SEED_OFFSET)
            if self._pending_generator_state is not None:
                self.generator.set_state(self._pending_generator_state)
                self._pending_generator_state = None
        return self.generator

    def state_dict(self) -> dict[str, Any]:
        """The noise generator's position (None before its first draw)."""
        if self.generator is not None:
            return {"generator": self.generator.get_state()}
        return {"generator": self._pending_generator_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        g = state.get("generator") if state else None
        if g is None:
            return
        g = g.to("cpu")
        if self.generator is not None:
            self.generator.set_state(g)
        else:
            self._pending_generator_state = g

    # ----------------------------------------------------------------- stage 2: attack
    def draw_noise(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """One draw u ~ N(0, noise_std^2) for every noise-scope tensor (one generator call per minibatch)."""
        params = dict(model.named_parameters())
        if model not in self._noise_names:
            self._noise_names[model] = noise_parameter_names(model, self.noise_scope)
        names = self._noise_names[model]
        if not names:
            return {}
        ref = params[names[0]]
        sizes = [params[n].numel() for n in names]
        flat = torch.randn(
            sum(sizes), generator=self._generator(ref.device), device=ref.device, dtype=ref.dtype
        )
        flat = flat * self.noise_std
        return {n: chunk.view_as(params[n]) for n, chunk in zip(names, flat.split(sizes))}

    @contextmanager
    def attack_context(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
        """The attack runs on w + u; the exact w is copied back on exit (also on error)."""
        self._u = {}
        if not self._draws_noise():
            yield
            return
        u = self.draw_noise(model)
        if self.variant == "fd_literal" and self.outer_active:
            self._u = u
        if not self.noise_in_attack:
            yield
            return
        # The shared weight-offset mechanism; copy back, since (w + u) - u is not w in floating point.
        with offset_weights(model, u, keep_update=False):
            yield

    # ----------------------------------------------------------------- stage 5: shared forwards
    def forward_context(self, out: StepForwards, branch: str) -> Any:
        """Captures the final linear layer's input during the shared forward of `branch`."""
        if not (self.outer_active and self.variant == "surrogate" and self.impl == "efficient"):
            return nullcontext()
        return self._capture_final_input(out, branch)

    @contextmanager
    def _capture_final_input(self, out: StepForwards, branch: str) -> Iterator[None]:
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            # Handed to this step's outer loss through the forwards object (freed with it).
            out.state[self, "final_input", branch] = inputs[0].detach()

        handle = resolve_layer(out.model, self.final_layer).register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # ----------------------------------------------------------------- stage 6: outer loss
    def _rowsums(self, out: StepForwards, z_nat: torch.Tensor, z_adv: torch.Tensor) -> tuple[Any, Any]:
        y = out.y
        if self.impl == "reference":
            # The authors' route: the gradient of the batch-mean CE w.r.t. the final weight, read back
            # and row-summed (two partial backwards through the final layer only).
            weight = cast(torch.Tensor, resolve_layer(out.model, self.final_layer).weight)
            r = []
            for z in (z_nat, z_adv):
                (g,) = torch.autograd.grad(F.cross_entropy(z, y), weight, retain_graph=True)
                r.append(g.to(_compute_dtype(g)).sum(1))
            return r[0], r[1]
        keys = [(self, "final_input", branch) for branch in ("clean", "adv")]
        if not all(k in out.state for k in keys):
            raise RuntimeError(
                "RWT: the final layer's input was not captured in this step's shared forwards; "
                "RWT.forward_context must be entered around them (TrainStep does this)"
            )
        h_nat, h_adv = (out.state.pop(k) for k in keys)
        return rowsum_gradient(z_nat.detach(), h_nat, y), rowsum_gradient(z_adv.detach(), h_adv, y)

    def _fd_literal_terms(
        self, out: StepForwards, z_nat: torch.Tensor, z_adv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """docs/methods/rwt.md#fd-literal: central differences along the minibatch's u; +4 forwards (and their
        backward)."""
        model = out.model
        params = dict(model.named_parameters())
        plus = {n: params[n] + u for n, u in self._u.items()}
        minus = {n: params[n] - u for n, u in self._u.items()}
        dt = _compute_dtype(z_nat)
        f: dict[tuple[str, int], torch.Tensor] = {}
        for sign, moved in ((1, plus), (-1, minus)):
            for branch, inp in (("clean", out.x), ("adv", out.x_adv)):
                # Copies of the buffers: the extra train-mode forwards must not move BN running stats.
                buffers = {n: b.clone() for n, b in model.named_buffers()}
                f[(branch, sign)] = functional_call(model, {**moved, **buffers}, (inp,)).to(dt)
        jac = {b: 0.5 * (f[(b, 1)] - f[(b, -1)]) for b in ("clean", "adv")}
        hess = {b: f[(b, 1)] + f[(b, -1)] - 2 * z.to(dt) for b, z in (("clean", z_nat), ("adv", z_adv))}
        first = kl_clean_adv(jac["adv"], jac["clean"]).mean()
        second = kl_clean_adv(hess["adv"], hess["clean"]).mean()
        return first, second

    def outer_loss(self, out: StepForwards, base: StepLoss) -> dict[str, torch.Tensor | Reweight]:
        """The label term's weight x (1 - eta), then eta * first and second_coef * eta * second."""
        if not self.outer_active:
            return {}
        # TRADES and MART computed both already; for PGD-AT this is RWT's one extra (clean) forward.
        z_nat, z_adv = out.logits("clean"), out.logits("adv")
        if self.variant == "fd_literal":
            first, second = self._fd_literal_terms(out, z_nat, z_adv)
        else:
            r_nat, r_adv = self._rowsums(out, z_nat, z_adv)
            with torch.no_grad():
                targets = taylor_targets(r_nat.detach(), r_adv.detach(), out.y, self.c, self.second_target)
            first, second = surrogate_terms(z_nat, z_adv, targets)
        self._u = {}
        terms: dict[str, torch.Tensor | Reweight] = {}
        if self.scale_base_ce:
            if base.label is None:
                raise RuntimeError("RWT scales the base's label term, but this defense marks none")
            terms["label_scale"] = Reweight(LABEL, -self.eta)
        terms["first"] = self.eta * first
        if self.order >= 2:
            terms["second"] = self.second_coef * self.eta * second
        return terms
