"""LAD / LAD-SM: layer-wise gradient perturbations of hidden states (docs/methods/lad.md).

Each training step, on top of the base defense:

1. a recording pass of the plain network on the base method's training input stores a_n = dL/dx_n at
   every residual-block boundary (activation gradients only, BN running statistics untouched);
2. a LAD pass adds eta * a_{n+1} after block n (Lie-Trotter, `scheme: lt`), or (eta/2) a_n before and
   (eta/4)(a_n + a_{n+1}) after block n (Strang-Marchuk, `scheme: sm`); its CE replaces the base method's
   CE term (docs/methods/lad.md#composition): natural CE(f(x)) and PGD-AT CE(f(x')) become CE(f_LAD(.));
   TRADES mixes
   gamma * CE(f(x)) + (1 - gamma) * CE(f_LAD(x')); MART's boosted CE is computed on f_LAD(x').

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

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.addons.base import Addon, AddonContext
from robust_train.addons.lad_ops import (
    NOISE_SCALE_MODES,
    SCHEMES,
    Adjoints,
    NoisyEnsemble,
    SiteNoise,
    StateTap,
    frozen_bn_stats,
    perturbation_hooks,
    residual_block_names,
    site_modules,
)
from robust_train.config import to_float
from robust_train.defenses.base import StepLoss
from robust_train.defenses.losses import mart_loss
from robust_train.errors import ConfigError
from robust_train.training.forwards import StepForwards

KEY = "addons.lad"
REDUCTIONS = ("mean", "sum")
SITES_ALL = "residual_blocks"
# Offsets of the noise generators' seeds from the run seed (distinct from the data generator's offset).
NOISE_SEED_OFFSET = 4_000_037
EVAL_NOISE_SEED_OFFSET = 4_000_049
# The branch whose shared forward becomes the LAD pass; TRADES and MART get an extra LAD forward instead.
IN_PLACE_BRANCH = {"standard": "clean", "pgd_at": "adv"}


def _get(node: Any, key: str, default: Any = None) -> Any:
    return node.get(key, default) if node is not None and hasattr(node, "get") else default


def _number(
    problems: list[str], node: Any, key: str, default: Any, lo: float, hi: float | None = None
) -> float | None:
    full = f"{KEY}.{key}"
    value = _get(node, key.split(".")[-1], default)
    allowed = f"allowed {lo:g} <= value" + (f" <= {hi:g}" if hi is not None else "")
    try:
        x = to_float(value, full)
    except ConfigError as err:
        problems.append(str(err))
        return None
    if not math.isfinite(x) or x < lo or (hi is not None and x > hi):
        problems.append(f"{full}={value!r} is out of range: {allowed}")
        return None
    return x


def _integer(problems: list[str], node: Any, key: str, default: int, lo: int) -> None:
    full = f"{KEY}.{key}"
    value = _get(node, key.split(".")[-1], default)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        problems.append(f"{full}={value!r} must be an integer >= {lo}")


def _choice(problems: list[str], node: Any, key: str, default: str, allowed: tuple[str, ...]) -> None:
    value = _get(node, key.split(".")[-1], default)
    if value not in allowed:
        problems.append(f"{KEY}.{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _flag(problems: list[str], node: Any, key: str, default: bool) -> None:
    value = _get(node, key.split(".")[-1], default)
    if not isinstance(value, bool):
        problems.append(f"{KEY}.{key}={value!r} must be true or false")


@dataclass
class _Armed:
    """The step in progress: the model being trained and its labels (set by `weight_perturbation`)."""

    model: nn.Module
    y: torch.Tensor


class LAD(Addon):
    """Layer-wise adversarial defense: gradient-ascent perturbations of every residual-block state."""

    name = "lad"
    supported_defenses = ("standard", "pgd_at", "trades", "mart")
    # docs/methods/lad.md#composition: recording and LAD passes at w + v, v searched on the plain network
    supports_awp = True
    conflicts_with: tuple[str, ...] = ()

    def __init__(self, cfg: Any, ctx: AddonContext) -> None:
        super().__init__(cfg, ctx)
        problems = self.check_config(cfg, ctx.cfg)
        if problems:
            raise ConfigError("; ".join(problems))
        self.defense_name = str(getattr(ctx.defense, "name", ""))
        if self.defense_name not in self.supported_defenses:
            raise ConfigError(
                f"addons=[lad] does not compose with defense={self.defense_name}; "
                f"supported: {', '.join(self.supported_defenses)}"
            )
        self.scheme = str(_get(cfg, "scheme", "lt"))
        self.eta = to_float(_get(cfg, "eta", 50.0), f"{KEY}.eta")
        self.loss_reduction = str(_get(cfg, "loss_reduction", "mean"))
        self.record_updates_bn_stats = bool(_get(cfg, "record_updates_bn_stats", False))
        self.trades_gamma = to_float(_get(cfg, "trades_gamma", 0.5), f"{KEY}.trades_gamma")
        self.log_ratio = bool(_get(cfg, "log_ratio", True))
        self.eta_warmup_epochs = int(_get(cfg, "eta_warmup_epochs", 0))
        self.eta_ramp_epochs = int(_get(cfg, "eta_ramp_epochs", 0))
        self.mart_beta = float(getattr(ctx.defense, "beta", 6.0))

        sites = _get(cfg, "sites", SITES_ALL)
        if sites == SITES_ALL:
            self.site_names = residual_block_names(ctx.model)
        else:
            self.site_names = list(dict.fromkeys(str(s) for s in sites))
        site_modules(ctx.model, self.site_names)  # unknown names fail here, at build time

        noise = _get(cfg, "noise")
        self.noise: SiteNoise | None = None
        self.noise_eval_samples = int(_get(noise, "eval_samples", 100))
        self.noise_attack_samples = int(_get(noise, "attack_samples", 1))
        if bool(_get(noise, "enabled", False)):
            self.noise = SiteNoise(
                to_float(_get(noise, "std", 0.1), f"{KEY}.noise.std"),
                str(_get(noise, "scale_mode", "absolute")),
                int(ctx.seed) + NOISE_SEED_OFFSET,
            )

        self.epoch = 0
        self.eta_now = self.eta_at(0)
        self._armed: _Armed | None = None
        self._tap: StateTap | None = None
        self.ratio_history: list[dict[str, float]] = []
        self._reset_ratio()

    # ----------------------------------------------------------------- config
    @classmethod
    def check_config(cls, cfg: Any, run_cfg: Any) -> list[str]:
        p: list[str] = []
        _choice(p, cfg, "scheme", "lt", SCHEMES)
        _number(p, cfg, "eta", 50.0, lo=0.0)
        iters = _get(cfg, "iters", 1)
        if iters != 1 or isinstance(iters, bool):
            p.append(f"{KEY}.iters={iters!r} is not supported; allowed: 1 (the seed's single ascent step)")
        sites = _get(cfg, "sites", SITES_ALL)
        if sites != SITES_ALL:
            ok = (
                not isinstance(sites, str)
                and hasattr(sites, "__iter__")
                and len(list(sites)) > 0
                and all(isinstance(s, str) and s for s in sites)
            )
            if not ok:
                p.append(
                    f"{KEY}.sites={sites!r} is not allowed; write {SITES_ALL} or a non-empty list of "
                    "residual-block layer names (e.g. [layer1.0, layer2.0])"
                )
        _choice(p, cfg, "loss_reduction", "mean", REDUCTIONS)
        _flag(p, cfg, "record_updates_bn_stats", False)
        _number(p, cfg, "trades_gamma", 0.5, lo=0.0, hi=1.0)
        _flag(p, cfg, "log_ratio", True)
        _integer(p, cfg, "eta_warmup_epochs", 0, lo=0)
        _integer(p, cfg, "eta_ramp_epochs", 0, lo=0)
        noise = _get(cfg, "noise")
        if noise is not None:
            _flag(p, noise, "noise.enabled", False)
            _number(p, noise, "noise.std", 0.1, lo=0.0)
            _choice(p, noise, "noise.scale_mode", "absolute", NOISE_SCALE_MODES)
            _integer(p, noise, "noise.eval_samples", 100, lo=1)
            _integer(p, noise, "noise.attack_samples", 1, lo=1)
        return p

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

    @contextmanager
    def weight_perturbation(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None, base_loss: Any
    ) -> Iterator[None]:
        # No weight change: this stage only marks the outer step (entered after AWP has searched its
        # perturbation on the plain network), so that forwards of other modules (AWP's proxy) stay plain.
        self._armed = _Armed(model=model, y=y)
        try:
            yield
        finally:
            self._armed = None
            self._tap = None

    def forward_context(self, model: nn.Module, branch: str, x_in: torch.Tensor) -> Any:
        return self._forward(model, branch, x_in)

    @contextmanager
    def _forward(self, model: nn.Module, branch: str, x_in: torch.Tensor) -> Iterator[None]:
        armed = self._armed
        main = armed is not None and model is armed.model and self.eta_now > 0
        with ExitStack() as stack:
            modules = site_modules(model, self.site_names) if (self.noise is not None or main) else []
            if self.noise is not None:
                stack.enter_context(self.noise.hooks(modules))
            if main and armed is not None:
                if branch == IN_PLACE_BRANCH.get(self.defense_name):
                    adj = self._record(model, modules, x_in, armed.y)
                    eta = self._eta_effective(armed.y)
                    stack.enter_context(perturbation_hooks(modules, adj, eta, self.scheme))
                elif branch == "adv" and self._extra_branch_weight() > 0:
                    # Keep the plain states of the shared x' forward: it is the recording pass
                    # docs/methods/lad.md#recording-pass.
                    self._tap = stack.enter_context(StateTap(modules, self._tap_inputs()))
            yield

    def outer_loss(self, out: StepForwards, base: StepLoss) -> dict[str, torch.Tensor]:
        if self.defense_name == "trades":
            if self.trades_gamma == 1.0 or base.label_term is None:
                return {}
            weight = 1.0 - self.trades_gamma
            ce_lad = F.cross_entropy(self._lad_adv_logits(out), out.y)
            # gamma * CE(f(x)) + (1 - gamma) * CE(f_LAD(x')) in place of the base's CE(f(x)).
            return {
                "ce_clean_rescale": (self.trades_gamma - 1.0) * base.label_term,
                "ce_lad": weight * ce_lad,
            }
        if self.defense_name == "mart" and base.label_term is not None and self._lad_runs(out):
            _, bce_lad, _ = mart_loss(
                out.logits("clean").detach(), self._lad_adv_logits(out), out.y, self.mart_beta
            )
            # MART's boosted CE moves from f(x') to f_LAD(x'); the KL term keeps the plain f(x').
            return {"bce_plain_removed": -base.label_term, "bce_lad": bce_lad}
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
        if self.defense_name == "trades":
            return 1.0 - self.trades_gamma
        return 1.0 if self.defense_name == "mart" else 0.0

    def _lad_runs(self, out: StepForwards) -> bool:
        armed = self._armed
        return self.eta_now > 0 and armed is not None and out.model is armed.model

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

    def _lad_adv_logits(self, out: StepForwards) -> torch.Tensor:
        """f_LAD(x') for TRADES / MART; the shared plain f(x') when LAD is not active in this step."""
        plain = out.logits("adv")
        if not self._lad_runs(out):
            return plain
        modules = site_modules(out.model, self.site_names)
        tap, self._tap = self._tap, None
        if tap is not None and tap.filled:
            # The shared plain x' forward is the recording forward: only its backward is extra (+1B);
            # the graph is kept for the step's backward.
            adj = tap.adjoints(self._record_loss(plain, out.y), retain_graph=True)
            self._observe_ratio(adj, out.y)
        else:
            adj = self._record(out.model, modules, out.x_adv, out.y)
        with ExitStack() as stack:
            if self.noise is not None:
                stack.enter_context(self.noise.hooks(modules))
            stack.enter_context(perturbation_hooks(modules, adj, self._eta_effective(out.y), self.scheme))
            return out.model(out.x_adv)  # the LAD branch: +1F (docs/methods/lad.md#cost)

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
