"""LAD / LAD-SM: layer-wise gradient perturbations of hidden states (docs/methods/lad.md).

Each training step, on top of the base defense:

1. a recording pass of the plain network on the base method's training input stores a_n = dL/dx_n at
   every residual-block boundary (activation gradients only, BN running statistics untouched);
2. a LAD pass adds eta * a_{n+1} after block n (Lie-Trotter, `scheme: lt`), or (eta/2) a_n before and
   (eta/4)(a_n + a_{n+1}) after block n (Strang-Marchuk, `scheme: sm`); its output replaces the base
   method's supervised term (docs/methods/lad.md#composition), re-evaluated with that term's own function
   (`Term.fn`): natural CE(f(x)) and PGD-AT CE(f(x')) become CE(f_LAD(.)); TRADES mixes
   gamma * CE(f(x)) + (1 - gamma) * CE(f_LAD(x')); MART's boosted CE is computed on f_LAD(x').

How the LAD pass enters the loss follows from what the base defense declares, never from its name:
its training input (`train_branch`), the branch its label term reads (`label_branch`) and every branch
its outer loss reads (`outer_branches`):
- in place (standard, PGD-AT): the training branch's forward feeds the label term only, so that shared
  forward itself becomes the LAD pass;
- replace (MART): the label term reads the training branch, which other terms read too: the label term
  is removed (`Reweight("label", -1)`) and re-evaluated on an extra LAD forward;
- mix (TRADES): the label term reads another branch (clean): its weight becomes `trades_gamma` and
  (1 - trades_gamma) x the label function of the LAD forward of the training input is added.

The adversarial example is crafted on the plain network, and AWP's search for its weight perturbation
uses the plain network; recording and LAD passes run at the weights being trained (w + v under AWP).

Extra passes per step (docs/methods/lad.md#cost), with eta > 0:
- standard / PGD-AT: +1F +1B (the recording pass, run inside `forward_context` before the shared
  forward of the trained branch, which itself becomes the LAD pass);
- TRADES / MART: +1B for the recording (it reuses the shared plain forward of x', which is the same
  forward docs/methods/lad.md#recording-pass would compute) and +1F for the LAD branch in `outer_loss` (its
  backward is part of the step's single backward). docs/methods/lad.md#cost; sharing saves it.
With eta = 0 and the noise off, nothing runs and the step is the base step (TRADES with gamma < 1 still
mixes the clean and adversarial CE, docs/methods/lad.md#trades-gamma).

The stochastic variant (`noise.enabled`) adds Gaussian noise at every site in every training forward
(attack steps, recording, shared and LAD forwards) from the add-on's own generator, and `wrap_for_eval`
returns a model that predicts the mean logits of `noise.eval_samples` noisy forwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import AfterValidator, BeforeValidator, Field
from torch import nn

from robust_train.addons.base import Addon, AddonConfig, AddonContext, divergence_guard
from robust_train.addons.lad_ops import (
    Adjoints,
    NoisyEnsemble,
    SiteNoise,
    StateTap,
    frozen_bn_stats,
    perturbation_hooks,
    residual_block_names,
    site_modules,
)
from robust_train.registry import ADDONS
from robust_train.schema import Flag, Integer, Number, Schema
from robust_train.step_types import LABEL, Reweight, StepForwards, StepLoss

KEY = "addons.lad"
SITES_ALL = "residual_blocks"
# Offsets of the noise generators' seeds from the run seed (distinct from the data generator's offset).
NOISE_SEED_OFFSET = 4_000_037
EVAL_NOISE_SEED_OFFSET = 4_000_049


def _at_least(lo: int) -> AfterValidator:
    def check(value: int) -> int:
        if value < lo:
            raise ValueError(f"must be an integer >= {lo}")
        return value

    return AfterValidator(check)


def _one_iteration(value: Any) -> Any:
    if value != 1 or isinstance(value, bool):
        raise ValueError("is not supported; allowed: 1 (the seed's single ascent step)")
    return value


def _sites(value: Any) -> Any:
    if value == SITES_ALL:
        return value
    ok = isinstance(value, list | tuple) and len(value) > 0 and all(isinstance(s, str) and s for s in value)
    if not ok:
        raise ValueError(
            f"is not allowed; write {SITES_ALL} or a non-empty list of residual-block layer names "
            "(e.g. [layer1.0, layer2.0])"
        )
    return list(dict.fromkeys(value))


class LADNoiseConfig(Schema):
    """`addons.lad.noise`: the stochastic variant (docs/methods/lad.md#noise)."""

    enabled: Flag = False
    # Std of the Gaussian noise at every site in every training forward (seed N(0, 0.01) read as variance).
    std: Annotated[Number, Field(ge=0)] = 0.1
    # absolute | relative (std x std of the block output, as in EnResNet's code).
    scale_mode: Literal["absolute", "relative"] = "absolute"
    # Evaluation predicts the mean logits of this many noisy forwards.
    eval_samples: Annotated[Integer, _at_least(1)] = 100
    # Noisy forwards averaged when an evaluation attack takes an input gradient.
    attack_samples: Annotated[Integer, _at_least(1)] = 1


class LADConfig(AddonConfig):
    """`addons.lad` (docs/methods/lad.md#presets). eta = 0 with the noise off is the base method."""

    # lt = LAD (Lie-Trotter) | sm = LAD-SM (Strang-Marchuk, also perturbs the block-0 input).
    scheme: Literal["lt", "sm"] = "lt"
    # Gradient scale; seed: 50 on CIFAR-10, 1000 on CIFAR-100 (re-tune for other backbones).
    eta: Annotated[Number, Field(ge=0), divergence_guard(1.0e5)] = 50.0
    # Ascent steps M on the hidden states; only 1 (the seed's value) is supported.
    iters: Annotated[Any, BeforeValidator(_one_iteration)] = 1
    # residual_blocks (the model's block_layers) or a list of block layer names.
    sites: Annotated[str | list[str], BeforeValidator(_sites)] = SITES_ALL
    # mean | sum: reduction of the recording CE; sum uses eta / batch (the same step).
    loss_reduction: Literal["mean", "sum"] = "mean"
    # true lets the recording pass update BN running statistics.
    record_updates_bn_stats: Flag = False
    # When the base's label term reads another branch than its training input (TRADES):
    # gamma * label term + (1 - gamma) * its function on f_LAD(x'); 1 = the base method.
    trades_gamma: Annotated[Number, Field(ge=0, le=1)] = 0.5
    # Keep ||block-0 output|| / ||dL/dx_0|| per epoch (seed Fig. 2; in the add-on state).
    log_ratio: Flag = True
    # Epochs trained with eta = 0 before LAD switches on, then a linear ramp over eta_ramp_epochs.
    eta_warmup_epochs: Annotated[Integer, _at_least(0)] = 0
    eta_ramp_epochs: Annotated[Integer, _at_least(0)] = 0
    noise: LADNoiseConfig = Field(default_factory=LADNoiseConfig)


@ADDONS.register("lad", schema=LADConfig)
class LAD(Addon):
    """Layer-wise adversarial defense: gradient-ascent perturbations of every residual-block state."""

    name = "lad"
    # docs/methods/lad.md#composition: recording and LAD passes at w + v, v searched on the plain network
    supports_awp = True
    conflicts_with: tuple[str, ...] = ()

    def __init__(self, cfg: Any, ctx: AddonContext) -> None:
        super().__init__(cfg, ctx)
        cfg = self.cfg
        defense = ctx.defense
        # docs/methods/lad.md#composition, from the base's declarations (see the module docstring).
        self.train_branch = str(defense.train_branch)
        self.label_branch = str(defense.label_branch)
        self.in_place = tuple(defense.outer_branches) == (self.train_branch,) and (
            self.label_branch == self.train_branch
        )
        self.scheme = cfg.scheme
        self.eta = cfg.eta
        self.loss_reduction = cfg.loss_reduction
        self.record_updates_bn_stats = cfg.record_updates_bn_stats
        self.trades_gamma = cfg.trades_gamma
        self.log_ratio = cfg.log_ratio
        self.eta_warmup_epochs = cfg.eta_warmup_epochs
        self.eta_ramp_epochs = cfg.eta_ramp_epochs

        if cfg.sites == SITES_ALL:
            self.site_names = residual_block_names(ctx.model)
        else:
            self.site_names = list(cfg.sites)
        site_modules(ctx.model, self.site_names)  # unknown names fail here, at build time

        noise = cfg.noise
        self.noise: SiteNoise | None = None
        self.noise_eval_samples = noise.eval_samples
        self.noise_attack_samples = noise.attack_samples
        if noise.enabled:
            self.noise = SiteNoise(noise.std, noise.scale_mode, int(ctx.seed) + NOISE_SEED_OFFSET)

        self.epoch = 0
        self.eta_now = self.eta_at(0)
        self.ratio_history: list[dict[str, float]] = []
        self._reset_ratio()

    # ----------------------------------------------------------------- schedule
    def eta_at(self, epoch: int) -> float:
        """eta at a (0-indexed) epoch: 0 in the warm-up, then a linear ramp, then the configured value."""
        if epoch < self.eta_warmup_epochs:
            return 0.0
        if self.eta_ramp_epochs > 0:
            return self.eta * min(1.0, (epoch - self.eta_warmup_epochs + 1) / self.eta_ramp_epochs)
        return self.eta

    def on_epoch_start(self, epoch: int) -> None:
        self._close_ratio_epoch()
        self.epoch = int(epoch)
        self.eta_now = self.eta_at(self.epoch)

    # ----------------------------------------------------------------- step hooks
    @contextmanager
    def attack_context(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
        # The attack sees the plain network; only the stochastic variant's noise is on while it runs.
        if self.noise is None:
            yield
            return
        with self.noise.hooks(site_modules(model, self.site_names)):
            yield

    def forward_context(self, out: StepForwards, branch: str) -> Any:
        return self._forward(out, branch)

    @contextmanager
    def _forward(self, out: StepForwards, branch: str) -> Iterator[None]:
        # Only the outer step's forwards: a perturbation search (AWP's proxy, after which this stage
        # runs) and forwards outside a step stay plain.
        main = out.outer_step and self.eta_now > 0
        model = out.model
        with ExitStack() as stack:
            modules = site_modules(model, self.site_names) if (self.noise is not None or main) else []
            if self.noise is not None:
                stack.enter_context(self.noise.hooks(modules))
            if main and branch == self.train_branch:
                if self.in_place:
                    adj = self._record(model, modules, out.input(branch), out.y)
                    eta = self._eta_effective(out.y)
                    stack.enter_context(perturbation_hooks(modules, adj, eta, self.scheme))
                elif self._extra_branch_weight() > 0:
                    # Keep the plain states of the shared training forward: it is the recording pass
                    # docs/methods/lad.md#recording-pass.
                    out.state[self, "tap"] = stack.enter_context(StateTap(modules, self._tap_inputs()))
            yield

    def outer_loss(self, out: StepForwards, base: StepLoss) -> dict[str, torch.Tensor | Reweight]:
        if self.in_place:
            return {}
        label = base.label
        if self.label_branch != self.train_branch:
            # Mix: gamma * label + (1 - gamma) * label_fn(f_LAD(x')) in place of the label term.
            if self.trades_gamma == 1.0 or label is None:
                return {}
            weight = 1.0 - self.trades_gamma
            lad = weight * self._label_fn(label)(self._lad_logits(out), out.y)
            return {"label_scale": Reweight(LABEL, self.trades_gamma - 1.0), "label_lad": lad}
        if label is not None and self._lad_runs(out):
            # Replace: the label term moves from the plain forward to f_LAD; other terms keep the plain.
            lad = self._label_fn(label)(self._lad_logits(out), out.y)
            return {"label_removed": Reweight(LABEL, -1.0), "label_lad": lad}
        return {}

    def wrap_for_eval(self, model: nn.Module) -> nn.Module:
        if self.noise is None:
            return model
        # A fresh generator per evaluation: the same noise stream for every evaluated checkpoint.
        noise = SiteNoise(self.noise.std, self.noise.scale_mode, int(self.ctx.seed) + EVAL_NOISE_SEED_OFFSET)
        return NoisyEnsemble(
            model, self.site_names, noise, self.noise_eval_samples, self.noise_attack_samples
        )

    # ----------------------------------------------------------------- LAD passes
    def _tap_inputs(self) -> str:
        if self.scheme == "sm":
            return "all"
        return "first" if self.log_ratio else "none"

    def _extra_branch_weight(self) -> float:
        """The weight of the extra LAD forward's term: 0 in place, 1 to replace, 1 - gamma to mix."""
        if self.in_place:
            return 0.0
        return 1.0 if self.label_branch == self.train_branch else 1.0 - self.trades_gamma

    @staticmethod
    def _label_fn(label: Any) -> Any:
        if label.fn is None:
            raise RuntimeError(
                "addons=[lad] re-evaluates the base defense's label term on its perturbed forward, but "
                "this defense's label term declares no `fn`"
            )
        return label.fn

    def _lad_runs(self, out: StepForwards) -> bool:
        return self.eta_now > 0 and out.outer_step

    def _eta_effective(self, y: torch.Tensor) -> float:
        # A sum-reduced recording carries B times the mean's gradients; eta / B gives the same step.
        return self.eta_now / y.shape[0] if self.loss_reduction == "sum" else self.eta_now

    def _record_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, reduction=self.loss_reduction)

    def record(self, model: nn.Module, x_in: torch.Tensor, y: torch.Tensor) -> Adjoints:
        """The recording pass docs/methods/lad.md#recording-pass on `x_in` with the model in its current mode;
        public for diagnostics."""
        return self._record(model, site_modules(model, self.site_names), x_in, y)

    def _record(
        self, model: nn.Module, modules: list[nn.Module], x_in: torch.Tensor, y: torch.Tensor
    ) -> Adjoints:
        tap = StateTap(modules, self._tap_inputs())
        with torch.enable_grad(), ExitStack() as stack:
            if not self.record_updates_bn_stats:
                stack.enter_context(frozen_bn_stats(model))
            with tap:
                logits = model(x_in)  # the recording pass: +1F (docs/methods/lad.md#cost)
            # +1B, activation gradients only: no parameter .grad is touched.
            adj = tap.adjoints(self._record_loss(logits, y))
        self._observe_ratio(adj, y)
        return adj

    def _lad_logits(self, out: StepForwards) -> torch.Tensor:
        """f_LAD of the training input (the mix and replace cases); the shared plain forward when LAD is
        not active in this step."""
        branch = self.train_branch
        plain = out.logits(branch)
        if not self._lad_runs(out):
            return plain
        modules = site_modules(out.model, self.site_names)
        tap = out.state.pop((self, "tap"), None)
        if tap is not None and tap.filled:
            # The shared plain forward is the recording forward: only its backward is extra (+1B);
            # the graph is kept for the step's backward.
            adj = tap.adjoints(self._record_loss(plain, out.y), retain_graph=True)
            self._observe_ratio(adj, out.y)
        else:
            adj = self._record(out.model, modules, out.input(branch), out.y)
        with ExitStack() as stack:
            if self.noise is not None:
                stack.enter_context(self.noise.hooks(modules))
            stack.enter_context(perturbation_hooks(modules, adj, self._eta_effective(out.y), self.scheme))
            return out.model(out.input(branch))  # the LAD branch: +1F (docs/methods/lad.md#cost)

    # ----------------------------------------------------------------- eta diagnostic
    # docs/methods/lad.md#eta-ratio
    def _reset_ratio(self) -> None:
        self._ratio_sum: torch.Tensor | None = None
        self._ratio_min: torch.Tensor | None = None
        self._ratio_max: torch.Tensor | None = None
        self._ratio_n = 0

    def _observe_ratio(self, adj: Adjoints, y: torch.Tensor) -> None:
        """Accumulate ||output of block 0|| / ||a_0|| on the device (read once per epoch)."""
        a0 = adj.inp[0] if adj.inp else None
        if not self.log_ratio or a0 is None or adj.first_output is None:
            return
        if self.loss_reduction == "sum":
            a0 = a0 / y.shape[0]
        r = (adj.first_output.norm() / a0.norm()).detach().double()
        if self._ratio_sum is None or self._ratio_min is None or self._ratio_max is None:
            self._ratio_sum, self._ratio_min, self._ratio_max = r, r, r
        else:
            self._ratio_sum = self._ratio_sum + r
            self._ratio_min = torch.minimum(self._ratio_min, r)
            self._ratio_max = torch.maximum(self._ratio_max, r)
        self._ratio_n += 1

    def ratio_summary(self) -> dict[str, float] | None:
        """Mean / min / max of the ratio over the steps of the current epoch so far (a host read)."""
        if (
            self._ratio_n == 0
            or self._ratio_sum is None
            or self._ratio_min is None
            or self._ratio_max is None
        ):
            return None
        return {
            "epoch": self.epoch + 1,
            "ratio_mean": float(self._ratio_sum) / self._ratio_n,
            "ratio_min": float(self._ratio_min),
            "ratio_max": float(self._ratio_max),
            "steps": self._ratio_n,
        }

    def _close_ratio_epoch(self) -> None:
        summary = self.ratio_summary()
        if summary is not None:
            self.ratio_history.append(summary)
        self._reset_ratio()

    def epoch_metrics(self) -> dict[str, float]:
        """The latest epoch's ratio diagnostic, for a logger (`lad/ratio_mean`, ...)."""
        summary = self.ratio_summary() or (self.ratio_history[-1] if self.ratio_history else None)
        if summary is None:
            return {}
        return {f"lad/{k}": v for k, v in summary.items() if k.startswith("ratio")} | {
            "lad/eta": self.eta_now
        }

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "eta": self.eta_now,
            "ratio_history": [dict(h) for h in self.ratio_history],
            "ratio_epoch": self.ratio_summary(),
            "noise": self.noise.state_dict() if self.noise is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))
        self.eta_now = self.eta_at(self.epoch)
        self.ratio_history = [dict(h) for h in state.get("ratio_history") or []]
        # Checkpoints are written at epoch ends: the running epoch's diagnostic is complete there.
        if state.get("ratio_epoch"):
            self.ratio_history.append(dict(state["ratio_epoch"]))
        self._reset_ratio()
        if self.noise is not None and state.get("noise"):
            self.noise.load_state_dict(state["noise"])
