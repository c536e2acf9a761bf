"""LAFEAT (Yu, Gao, Xu, CVPR 2021): an L-inf attack that mixes latent-head and output logits
(docs/methods/lafeat.md).

The attack receives its latent heads from a heads source (robust_train.attacks.lafeat_heads): small conv
heads on intermediate feature maps of the frozen model, trained to predict the model's own prediction
and cached on disk per weights and settings (docs/methods/lafeat.md#heads). A configured LAFEAT
(`LAFEAT.from_config`, what `eval.attacks.<name>: {name: lafeat, ...}` builds) gets a `HeadCache` made
from the node's `head_*` keys; the attack itself never trains.

The attack (docs/methods/lafeat.md#attack, docs/methods/lafeat.md#targeted,
docs/methods/lafeat.md#orchestration): per run with a fixed mixing weight beta, APGD-style start,
cosine-annealed sign step from 2 eps, momentum 0.75, margin-normalized logits
`zc = beta * m_h * h / s(h) + (1 - beta * m_h) * z / s(z)`; examples already misclassified freeze.
A run of N iterations scores the iterates it takes gradients at, x_0 ... x_{N-1}, as the official
loop does; the last update's result x_N is never scored. Runs go over the betas in the interleaved
order (0.4, 0.5, 0.3, ...) and attack only the points still robust; `targeted: true` adds, after
the untargeted runs, one run per beta and per target class (the 2nd..10th largest clean logits) on
-CE towards the target, each target from a fresh random start.

The attack works on a whole evaluation set at once (`whole_set`): it sorts the points by clean margin
and batches them itself, and it fingerprints the model once per call (through its heads source).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks.base import Attack, AttackConfig, BNMode, Objective
from robust_train.attacks.lafeat_heads import HeadCache, HeadSettings, HeadSource
from robust_train.attacks.threat import ThreatModel
from robust_train.errors import ConfigError
from robust_train.models.features import capture_features, resolve_layer
from robust_train.registry import ATTACKS
from robust_train.schema import (
    Flag,
    Integer,
    NonNegativeInt,
    PositiveInt,
    PositiveNumber,
    UnitNumber,
    validate_node,
)

# The attacking head and the trained heads per architecture (docs/methods/lafeat.md#architectures). WRN-34-10
# is the official setting
# (heads on block3.layer.1..4, attack with block3.layer.3); PreAct/ResNet-18 use the penultimate residual
# block layer4.0 and train a second head on layer3.1 for ablation. Other models fall back to the rule
# "penultimate block attacks, the last four blocks get heads".
ARCH_LAYERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "wrn34_10": ("block3.layer.3", ("block3.layer.1", "block3.layer.2", "block3.layer.3", "block3.layer.4")),
    "preact_resnet18": ("layer4.0", ("layer3.1", "layer4.0")),
    "resnet18": ("layer4.0", ("layer3.1", "layer4.0")),
}
DEFAULT_BETAS = tuple(round(0.1 * i, 10) for i in range(10))  # 0.0, 0.1, ..., 0.9
_EPS_SHRINK = 1.9e-8  # the official float-safety shrink of eps
_MARGIN_TINY = 1e-8
_MOMENTUM = 0.75


def beta_order(betas: Sequence[float], schedule: bool = True) -> list[float]:
    """The run order of the mixing weights: halves interleaved from the middle outward
    (docs/methods/lafeat.md#orchestration).

    [0.0, 0.1, ..., 0.9] -> [0.4, 0.5, 0.3, 0.6, 0.2, 0.7, 0.1, 0.8, 0.0, 0.9]; `schedule=False` keeps
    the given order.
    """
    betas = [float(b) for b in betas]
    if not schedule:
        return betas
    half = len(betas) // 2
    lower, upper = betas[:half][::-1], betas[half:]
    order: list[float] = []
    for i in range(max(len(lower), len(upper))):
        order += ([lower[i]] if i < len(lower) else []) + ([upper[i]] if i < len(upper) else [])
    return order


def default_layers(model: nn.Module) -> tuple[str, list[str]]:
    """(attacking layer, layers with a trained head) for the model's architecture
    (docs/methods/lafeat.md#architectures)."""
    base = getattr(model, "_orig_mod", model)
    arch = getattr(base, "arch", "")
    if arch in ARCH_LAYERS:
        layer, heads = ARCH_LAYERS[arch]
        return layer, list(heads)
    blocks = list(getattr(base, "block_layers", []) or [])
    if len(blocks) < 2:
        raise ConfigError(
            f"LAFEAT cannot pick a layer for model '{arch or type(base).__name__}' (it declares no residual "
            "blocks); set the attack's `layer` (and `head_layers`) to one of its submodules"
        )
    return blocks[-2], blocks[-4:]


def _margin_scale(logits: torch.Tensor) -> torch.Tensor:
    """top1 - top2 + 1e-8 per example, detached (the margin normalization of docs/methods/lafeat.md#attack),
    shaped (B, 1)."""
    top2 = logits.detach().topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1] + _MARGIN_TINY).unsqueeze(1)


def mixed_logits(z: torch.Tensor, h: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """`beta * m_h * h / s(h) + (1 - beta * m_h) * z / s(z)`, m_h = [the head still predicts y]."""
    m_h = (h.detach().argmax(1) == y).to(z.dtype).unsqueeze(1)
    return beta * m_h * h / _margin_scale(h) + (1 - beta * m_h) * z / _margin_scale(z)


class LAFEATConfig(AttackConfig):
    """`lafeat` (docs/methods/lafeat.md#presets): the attack's keys and the `head_*` keys of its heads.

    `layer: auto` attacks with the architecture's penultimate residual block and `head_layers: auto`
    trains heads on the docs/methods/lafeat.md#architectures layers; `head_data: train` trains the heads
    on the training split of `head_dataset` (the run's `${dataset}` in the presets), `attacked` on the
    images under attack. `cache_dir: null` caches in $ROBUST_TRAIN_CACHE/lafeat.
    """

    name: str = "lafeat"
    iterations: NonNegativeInt = 100
    betas: list[UnitNumber] = list(DEFAULT_BETAS)
    beta_schedule: Flag = True
    targeted: Flag = False
    n_targets: PositiveInt = 9
    layer: str | None = "auto"
    head_layers: str | list[str] | None = "auto"
    head_epochs: NonNegativeInt = 100
    head_samples: PositiveInt | None = None
    head_batch_size: PositiveInt = 128
    head_lr: PositiveNumber = 1e-3
    head_channels: PositiveInt = 64
    head_hidden: PositiveInt = 256
    head_augment: Flag = True
    head_data: Literal["train", "attacked"] = "train"
    head_dataset: dict[str, Any] | None = None
    head_seed: Integer = 0
    cache_dir: str | None = None
    batch_size: PositiveInt = 500
    seed: Integer = 0
    bn_mode: BNMode = "eval"

    def check(self, path: str) -> list[str]:
        problems = super().check(path)
        if self.norm not in (None, "linf"):
            problems.append(f"{path}.norm={self.norm!r}: lafeat is an L-inf attack; allowed: linf")
        if self.eps is not None and self.eps > 1:
            problems.append(f"{path}.eps={self.eps!r} is out of range: allowed 0 <= value <= 1")
        if not self.betas:
            problems.append(f"{path}.betas=[] must be a non-empty list of numbers in [0, 1]")
        if self.head_data == "train" and not self.head_dataset:
            problems.append(
                f"{path}.head_data=train needs {path}.head_dataset (e.g. ${{dataset}}); or head_data=attacked"
            )
        return problems

    def check_threat(self, norm: str | None, eps: float | None, path: str) -> list[str]:
        # The node inherits the run's norm unless it sets its own: an L2 run cannot run it as written.
        if self.norm is None and norm not in (None, "linf"):
            return [
                f"{path}: lafeat is an L-inf attack but threat.norm={norm!r}; set {path}.norm=linf "
                f"(with its own eps) or drop it with ~{path}"
            ]
        return []

    def head_settings(self) -> HeadSettings:
        return HeadSettings(
            epochs=self.head_epochs,
            samples=self.head_samples,
            batch_size=self.head_batch_size,
            lr=self.head_lr,
            channels=self.head_channels,
            hidden=self.head_hidden,
            augment=self.head_augment,
            data=self.head_data,
            dataset=self.head_dataset,
            data_seed=self.head_seed,
            seed=self.seed,
        )


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
    return value


def _auto(value: Any) -> Any:
    return None if value in (None, "auto") else value


@ATTACKS.register("lafeat", schema=LAFEATConfig)
class LAFEAT(Attack):
    """LAFEAT, untargeted or multi-targeted; see the module docstring.

    `heads` is the heads source: `heads(model, x, layers)` returns trained heads for those layers of
    the model's weights (a `HeadCache`, or a fixed `LatentHeads`). After a call, `report` holds the
    layer, the heads' provenance (cache file, whether they came from the cache, their agreement with the
    model on their training data) and the robust accuracy after every run.
    """

    name = "lafeat"
    whole_set = True

    def __init__(
        self,
        threat: ThreatModel,
        heads: HeadSource,
        iterations: int = 100,
        betas: Sequence[float] = DEFAULT_BETAS,
        beta_schedule: bool = True,
        targeted: bool = False,
        n_targets: int = 9,
        layer: str | None = None,
        head_layers: Sequence[str] | None = None,
        batch_size: int = 500,
        seed: int = 0,
        bn_mode: str = "eval",
    ) -> None:
        super().__init__(bn_mode)
        if threat.norm != "linf":
            raise ConfigError(f"lafeat is an L-inf attack; threat.norm={threat.norm!r} is not supported")
        self.threat = threat
        self.iterations = _positive_int(iterations, "lafeat.iterations", 0)
        self.betas = [float(b) for b in betas]
        if not self.betas or any(not 0.0 <= b <= 1.0 for b in self.betas):
            raise ConfigError(f"lafeat.betas={list(betas)!r} must be a non-empty list of numbers in [0, 1]")
        self.beta_schedule = bool(beta_schedule)
        self.targeted = bool(targeted)
        self.n_targets = _positive_int(n_targets, "lafeat.n_targets")
        self.layer = layer
        self.head_layers = list(head_layers) if head_layers else None
        self.batch_size = _positive_int(batch_size, "lafeat.batch_size")
        self.seed = int(seed)
        self.heads = heads
        self.report: dict[str, Any] = {}
        if self.targeted:
            self.name = "lafeat_targeted"

    @classmethod
    def from_config(cls, cfg: Any, threat: ThreatModel, key: str = "attack") -> LAFEAT:
        """The attack a `lafeat` node describes, with a `HeadCache` built from its `head_*` keys.

        `cfg` is a validated LAFEATConfig (from build_attack) or a plain mapping, validated here;
        `threat` already carries the node's own eps/norm override.
        """
        if not isinstance(cfg, LAFEATConfig):
            cfg = validate_node(LAFEATConfig, cfg, key)
        head_layers = _auto(cfg.head_layers)
        return cls(
            threat,
            HeadCache(cfg.head_settings(), cfg.cache_dir),
            iterations=cfg.iterations,
            betas=list(cfg.betas),
            beta_schedule=cfg.beta_schedule,
            targeted=cfg.targeted,
            n_targets=cfg.n_targets,
            layer=_auto(cfg.layer),
            head_layers=[head_layers] if isinstance(head_layers, str) else head_layers,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            bn_mode=cfg.bn_mode,
        )

    def _layers(self, model: nn.Module) -> tuple[str, list[str]]:
        """(attacking layer, layers that need a head); the attacking layer is always one of them."""
        auto_layer, auto_heads = default_layers(model) if self.layer is None else (self.layer, [self.layer])
        layer = self.layer or auto_layer
        heads = list(self.head_layers) if self.head_layers else auto_heads
        if layer not in heads:
            heads.append(layer)
        for name in heads:
            resolve_layer(model, name)  # ConfigError naming the layer and the known ones
        return layer, heads

    # ------------------------------------------------------------------ attack
    def _run(
        self,
        model: nn.Module,
        head: nn.Module,
        layer: str,
        x: torch.Tensor,
        y: torch.Tensor,
        beta: float,
        target: torch.Tensor | None,
        draw: int = 0,
    ) -> torch.Tensor:
        """One N-iteration run with a fixed beta (docs/methods/lafeat.md#attack,
        docs/methods/lafeat.md#targeted) from the `draw`-th random start.

        Returns the last iterate the run scored: x_{N-1}, or x_i if every point was fooled at x_i.
        Fooled points are frozen where they were first fooled, so for them it is that iterate.
        """
        eps = max(self.threat.eps - _EPS_SHRINK, 0.0)
        lo, hi = (x - eps).clamp(min=0), (x + eps).clamp(max=1)
        # The official code resets the torch seed before every run: the same start for every beta.
        # Its targeted attack reseeds once and draws the next start for each target in turn.
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        for _ in range(draw + 1):
            t = 2 * torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) - 1
        t = t / t.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        x_cur = (x + eps * t).clamp(0, 1)
        x_prev = x_cur
        x_scored = x_cur  # N = 0: the start, which perturb's fresh forward then scores
        shape = (-1,) + (1,) * (x.dim() - 1)
        with capture_features(model, [layer]) as feats:
            for i in range(self.iterations):
                eta = 2 * eps * (1 + math.cos(math.pi * i / self.iterations)) / 2
                xr = x_cur.clone().requires_grad_(True)
                z = model(xr)
                h = head(feats[layer])
                m_z = z.detach().argmax(1) == y
                # The official loop scores the iterate it takes the gradient at and only then steps,
                # so the step's result is scored at the next iteration and x_N never is.
                x_scored = x_cur
                if not bool(m_z.any()):
                    self.forward_passes += 1
                    break
                zc = mixed_logits(z, h, y, beta)
                loss = -F.cross_entropy(zc, target, reduction="sum") if target is not None else \
                    F.cross_entropy(zc, y, reduction="sum")  # fmt: skip
                (grad,) = torch.autograd.grad(loss, xr)
                self.forward_passes += 1
                self.backward_passes += 1
                with torch.no_grad():
                    m = m_z.to(x.dtype).view(shape)
                    x_step = torch.minimum(torch.maximum(x_cur + m * eta * grad.sign(), lo), hi)
                    a = 1.0 if i == 0 else _MOMENTUM
                    x_next = x_cur + m * (a * (x_step - x_cur) + (1 - a) * (x_cur - x_prev))
                    x_next = torch.minimum(torch.maximum(x_next, lo), hi)
                x_prev, x_cur = x_cur, x_next
        return x_scored.detach()

    def perturb(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective
    ) -> torch.Tensor:
        x = x.detach()
        if x.shape[0] == 0:
            return x
        start = time.perf_counter()
        layer, layers = self._layers(model)
        heads = self.heads(model, x, layers)
        head = heads[layer]
        bs = self.batch_size
        with torch.no_grad():
            clean = torch.cat([model(x[i : i + bs]) for i in range(0, x.shape[0], bs)])
        self.forward_passes += -(-x.shape[0] // bs)
        robust = clean.argmax(1) == y
        top2 = clean.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        ranked = clean.argsort(dim=1, descending=True)  # targets: the c-th largest clean logit
        x_adv = x.clone()
        runs: list[tuple[float, int | None]] = [(b, None) for b in beta_order(self.betas, self.beta_schedule)]
        if self.targeted:
            n_targets = min(self.n_targets, clean.shape[1] - 1)
            runs += [
                (b, c) for b in beta_order(self.betas, self.beta_schedule) for c in range(1, n_targets + 1)
            ]
        history = []
        for beta, c in runs:
            idx = robust.nonzero().flatten()
            if idx.numel() > 0:
                # Hardest points first, as the official code batches by ascending clean margin.
                idx = idx[margin[idx].argsort()]
                for i in range(0, idx.numel(), bs):
                    b = idx[i : i + bs]
                    target = None if c is None else ranked[b, c]
                    # Target rank c + 1 takes the c-th start after the reseed, so rank 2 starts where
                    # the untargeted run did and every later target from a fresh one.
                    draw = 0 if c is None else c - 1
                    xb = self._run(model, head, layer, x[b], y[b], beta, target, draw)
                    with torch.no_grad():
                        fooled = model(xb).argmax(1) != y[b]
                    self.forward_passes += 1
                    # Points still robust keep this run's last scored iterate (the next run overwrites it;
                    # fooled points leave the robust set and are frozen). Accuracy is the same as when
                    # only fooled points are replaced, but layer-wise analyses of "LAFEAT inputs" then
                    # see perturbed inputs everywhere, not clean ones for every robust point.
                    x_adv[b] = xb
                    robust[b[fooled]] = False
            history.append({"beta": beta, "target_rank": None if c is None else c + 1,
                            "robust_accuracy": round(100.0 * robust.float().mean().item(), 4)})  # fmt: skip
        self.report = {
            "layer": layer,
            "heads": dict(heads.info),
            "clean_accuracy": round(100.0 * (clean.argmax(1) == y).float().mean().item(), 4),
            "runs": history,
            "time_s": round(time.perf_counter() - start, 3),
        }
        return x_adv

    def describe(self) -> dict:
        return {
            "name": self.name,
            "norm": self.threat.norm,
            "eps": self.threat.eps,
            "iterations": self.iterations,
            "betas": beta_order(self.betas, self.beta_schedule),
            "targeted": self.targeted,
            "n_targets": self.n_targets if self.targeted else 0,
            "layer": self.layer or "auto",
            "head_layers": self.head_layers or "auto",
            **self.heads.describe(),  # head_epochs, head_samples, head_data
            "batch_size": self.batch_size,
            "seed": self.seed,
            "bn_mode": self.bn_mode,
        }
