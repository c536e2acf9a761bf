"""LAFEAT (Yu, Gao, Xu, CVPR 2021): an L-inf attack that mixes latent-head and output logits
(docs/methods/lafeat.md).

Two parts:

1. **Latent heads** (docs/methods/lafeat.md#heads). Small conv heads read intermediate feature maps of the
  *frozen* model and
   learn to predict the model's own prediction `argmax f(x)` (not the ground truth). They are trained
   once per checkpoint with Adam and a cosine schedule and cached on disk: the cache file is keyed by
   a hash of the model's state_dict and of every head setting, so a second evaluation of the same
   weights loads them instead of training.

   Training data (`head_data`): the official code trains the heads on the training set with the
   training augmentation, so the default is `train`: the training split of the dataset node given in
   `head_dataset` (the run's `${dataset}` in the presets), with that dataset's crop/flip settings.
   `attacked` trains on the images under attack instead (no training set needed: for tests and quick
   checks; the labels are still the model's predictions, never ground truth). `head_samples` and
   `head_epochs` bound the cost on a CPU.

2. **The attack** (docs/methods/lafeat.md#attack, docs/methods/lafeat.md#targeted,
  docs/methods/lafeat.md#orchestration). Per run with a fixed mixing weight beta: APGD-style start, cosine-
  annealed
   sign step from 2 eps, momentum 0.75, margin-normalized logits
   `zc = beta * m_h * h / s(h) + (1 - beta * m_h) * z / s(z)`; examples already misclassified freeze.
   A run of N iterations scores the iterates it takes gradients at, x_0 ... x_{N-1}, as the official
   loop does; the last update's result x_N is never scored. Runs go over the betas in the interleaved
   order (0.4, 0.5, 0.3, ...) and attack only the points still robust; `targeted: true` adds, after
   the untargeted runs, one run per beta and per target class (the 2nd..10th largest clean logits) on
   -CE towards the target, each target from a fresh random start.

The attack works on a whole evaluation set at once (`whole_set`): it sorts the points by clean margin
and batches them itself, and it fingerprints the model once per call.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from robust_train.attacks.base import Attack, Objective, attack_mode
from robust_train.attacks.threat import ThreatModel
from robust_train.errors import ConfigError
from robust_train.io import atomic_write
from robust_train.models.features import capture_features, forward_with_features, resolve_layer

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
HEAD_DATA = ("train", "attacked")
_EPS_SHRINK = 1.9e-8  # the official float-safety shrink of eps
_MARGIN_TINY = 1e-8
_MOMENTUM = 0.75
_NOT_TRAIN_SPLIT = ("test_limit", "root", "download", "check_integrity")


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


class LatentHead(nn.Module):
    """The official head template (docs/methods/lafeat.md#heads), sized from the tapped feature's shape.

    Conv(k2,s2) -> ReLU -> Conv(k2,s2) -> ReLU -> flatten -> Linear(hidden) -> ReLU -> Linear(K). A conv
    whose input is already 1 pixel wide uses kernel and stride 1, so the template fits any spatial size
    (4x4 maps of PreActResNet-18's layer4 end at 1x1, as docs/methods/lafeat.md#architectures prescribes).
    """

    def __init__(
        self, in_shape: Sequence[int], num_classes: int, channels: int = 64, hidden: int = 256
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if len(in_shape) == 3:
            c, h, w = (int(s) for s in in_shape)
            for _ in range(2):
                k = 2 if min(h, w) >= 2 else 1
                layers += [nn.Conv2d(c, channels, k, stride=k, bias=False), nn.ReLU()]
                c, h, w = channels, h // k, w // k
            flat = c * h * w
        else:
            flat = int(math.prod(in_shape))
        layers += [nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.net(feature)


def _margin_scale(logits: torch.Tensor) -> torch.Tensor:
    """top1 - top2 + 1e-8 per example, detached (the margin normalization of docs/methods/lafeat.md#attack),
    shaped (B, 1)."""
    top2 = logits.detach().topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1] + _MARGIN_TINY).unsqueeze(1)


def mixed_logits(z: torch.Tensor, h: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """`beta * m_h * h / s(h) + (1 - beta * m_h) * z / s(z)`, m_h = [the head still predicts y]."""
    m_h = (h.detach().argmax(1) == y).to(z.dtype).unsqueeze(1)
    return beta * m_h * h / _margin_scale(h) + (1 - beta * m_h) * z / _margin_scale(z)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the state_dict's names, dtypes, shapes and bytes (the weights identify the heads)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """$ROBUST_TRAIN_CACHE/lafeat, else $XDG_CACHE_HOME (default ~/.cache)/robust-train/lafeat."""
    root = os.environ.get("ROBUST_TRAIN_CACHE")
    if root:
        return Path(root).expanduser() / "lafeat"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "robust-train" / "lafeat"


def _positive_int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
    return value


class LAFEAT(Attack):
    """LAFEAT, untargeted or multi-targeted; see the module docstring.

    After a call, `report` holds the layers, whether the heads came from the cache, their agreement
    with the model on their training data, and the robust accuracy after every run.
    """

    name = "lafeat"
    whole_set = True

    def __init__(
        self,
        threat: ThreatModel,
        iterations: int = 100,
        betas: Sequence[float] = tuple(round(0.1 * i, 10) for i in range(10)),
        beta_schedule: bool = True,
        targeted: bool = False,
        n_targets: int = 9,
        layer: str | None = None,
        head_layers: Sequence[str] | None = None,
        head_epochs: int = 100,
        head_samples: int | None = None,
        head_batch_size: int = 128,
        head_lr: float = 1e-3,
        head_channels: int = 64,
        head_hidden: int = 256,
        head_augment: bool = True,
        head_data: str | torch.Tensor = "train",
        head_dataset: Mapping[str, Any] | None = None,
        head_seed: int = 0,
        cache_dir: str | Path | None = None,
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
        self.head_epochs = _positive_int(head_epochs, "lafeat.head_epochs", 0)
        self.head_samples = (
            None if head_samples is None else _positive_int(head_samples, "lafeat.head_samples")
        )
        self.head_batch_size = _positive_int(head_batch_size, "lafeat.head_batch_size")
        self.head_lr = float(head_lr)
        if not self.head_lr > 0:
            raise ConfigError(f"lafeat.head_lr={head_lr!r} must be > 0")
        self.head_channels = _positive_int(head_channels, "lafeat.head_channels")
        self.head_hidden = _positive_int(head_hidden, "lafeat.head_hidden")
        self.head_augment = bool(head_augment)
        if isinstance(head_data, torch.Tensor):
            if head_data.dtype != torch.uint8 or head_data.dim() != 4:
                raise ConfigError("lafeat.head_data as a tensor must hold uint8 NCHW images")
        elif head_data not in HEAD_DATA:
            raise ConfigError(
                f"lafeat.head_data={head_data!r} is not allowed; choose one of: {', '.join(HEAD_DATA)}"
            )
        elif head_data == "train" and not head_dataset:
            raise ConfigError(
                "lafeat.head_data=train needs lafeat.head_dataset (the dataset node, `${dataset}` in the "
                "presets); or set lafeat.head_data=attacked"
            )
        self.head_data = head_data
        self.head_dataset = dict(head_dataset) if head_dataset else None
        self.head_seed = int(head_seed)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.batch_size = _positive_int(batch_size, "lafeat.batch_size")
        self.seed = int(seed)
        self.report: dict[str, Any] = {}
        self.heads_trained = 0  # how many times heads were trained (not loaded) by this object
        self._heads: nn.ModuleDict | None = None
        self._heads_key: str | None = None
        self._head_info: dict[str, Any] = {}
        if self.targeted:
            self.name = "lafeat_targeted"

    # ------------------------------------------------------------------ heads
    def _layers(self, model: nn.Module) -> tuple[str, list[str]]:
        auto_layer, auto_heads = default_layers(model) if self.layer is None else (self.layer, [self.layer])
        layer = self.layer or auto_layer
        heads = list(self.head_layers) if self.head_layers else auto_heads
        if layer not in heads:
            heads.append(layer)
        for name in heads:
            resolve_layer(model, name)  # ConfigError naming the layer and the known ones
        return layer, heads

    def _head_config(self, heads: list[str], num_classes: int, x_attacked: torch.Tensor) -> dict[str, Any]:
        if isinstance(self.head_data, torch.Tensor):
            data: Any = {
                "tensor": list(self.head_data.shape),
                "sum": int(self.head_data.sum(dtype=torch.int64)),
            }
        elif self.head_data == "train":
            # Keys that do not change the training split stay out, so e.g. another test_limit or data
            # root reuses the heads.
            node = {k: v for k, v in (self.head_dataset or {}).items() if k not in _NOT_TRAIN_SPLIT}
            data = {"dataset": node, "seed": self.head_seed}
        else:
            # Heads fit to other images are other heads: the attacked set is part of the key.
            data = {"attacked": list(x_attacked.shape), "sum": float(x_attacked.double().sum())}
        return {
            "layers": heads,
            "num_classes": num_classes,
            "channels": self.head_channels,
            "hidden": self.head_hidden,
            "epochs": self.head_epochs,
            "samples": self.head_samples,
            "batch_size": self.head_batch_size,
            "lr": self.head_lr,
            "augment": self.head_augment,
            "seed": self.seed,
            "data": data,
        }

    def _training_images(self, x_attacked: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """uint8 images for head training, on the attack's device, and their augmentation settings."""
        aug = {"pad": 4, "flip": False, "padding_mode": "zero"}
        if isinstance(self.head_data, torch.Tensor):
            images = self.head_data
        elif self.head_data == "attacked":
            images = (x_attacked.detach() * 255).round().clamp(0, 255).to(torch.uint8)
        else:
            from robust_train.data import build_dataset  # attacks -> data is a downward import

            node = self.head_dataset or {}
            images = build_dataset(node, self.head_seed).train_x
            aug = {
                "pad": int(node.get("crop_pad", 4) or 0),
                "flip": bool(node.get("flip", True)),
                "padding_mode": str(node.get("padding_mode") or "zero"),
            }
        if self.head_samples is not None:
            images = images[: self.head_samples]
        if images.shape[0] == 0:
            raise ConfigError("lafeat: no images to train the latent heads on")
        return images.to(x_attacked.device), aug

    def _build_heads(self, model: nn.Module, heads: list[str], x: torch.Tensor) -> tuple[nn.ModuleDict, int]:
        with torch.no_grad():
            logits, feats = forward_with_features(model, x[:1], heads, detach=True)
        num_classes = int(logits.shape[1])
        if num_classes < 2:
            raise ConfigError("lafeat needs at least 2 classes (its margins use the top-2 logits)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            modules = nn.ModuleDict(
                {
                    _key(name): LatentHead(
                        feats[name].shape[1:], num_classes, self.head_channels, self.head_hidden
                    )
                    for name in heads
                }
            )
        return modules.to(device=x.device, dtype=x.dtype), num_classes

    def train_heads(self, model: nn.Module, heads: nn.ModuleDict, layers: list[str], images: torch.Tensor,
                    aug: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
        """Fit the heads to the frozen model's predictions: sum of CE over heads, Adam, cosine
        (docs/methods/lafeat.md#heads).

        The model runs under no_grad in eval mode with frozen parameters; only the heads learn.
        Returns the heads' agreement with the model (%) in the last epoch and the cost.
        """
        from robust_train.data import augment_batch, to_float

        opt = torch.optim.Adam(heads.parameters(), lr=self.head_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.head_epochs, 1), eta_min=1e-5)
        gen = torch.Generator().manual_seed(self.seed)
        n = images.shape[0]
        agree = {name: 0 for name in layers}
        forwards, start = 0, time.perf_counter()
        heads.train()
        # Head training is the slow part of a first LAFEAT evaluation (100 epochs over the training set).
        bar = tqdm(
            range(self.head_epochs), desc="lafeat heads", unit="epoch", leave=False, dynamic_ncols=True
        )
        for _ in bar:
            perm = torch.randperm(n, generator=gen).to(images.device)
            # Agreement counts stay on the device: one host read per epoch, not one per batch.
            agree = {name: torch.zeros((), dtype=torch.long, device=images.device) for name in layers}
            for i in range(0, n, self.head_batch_size):
                xb = images[perm[i : i + self.head_batch_size]]
                if self.head_augment:
                    xb = augment_batch(xb, aug["pad"], aug["flip"], aug["padding_mode"], generator=gen)
                else:
                    xb = to_float(xb)
                with torch.no_grad():
                    logits, feats = forward_with_features(model, xb, layers, detach=True)
                forwards += 1
                labels = logits.argmax(1)
                loss = torch.zeros((), device=xb.device)
                for name in layers:
                    out = heads[_key(name)](feats[name])
                    loss = loss + F.cross_entropy(out, labels)
                    agree[name] += (out.argmax(1) == labels).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            agree = {name: int(count) for name, count in agree.items()}
            bar.set_postfix(agree=f"{100.0 * min(agree.values()) / max(n, 1):.1f}%", refresh=False)
        bar.close()
        heads.eval()
        for p in heads.parameters():
            p.requires_grad_(False)
        return {
            "agreement_last_epoch": {name: round(100.0 * agree[name] / n, 2) for name in layers},
            "images": n,
            "model_forwards": forwards,
            "training_time_s": round(time.perf_counter() - start, 3),
        }

    def heads_for(self, model: nn.Module, x: torch.Tensor) -> tuple[nn.ModuleDict, str, list[str]]:
        """The trained heads for this model's weights: from memory, the disk cache, or trained now."""
        layer, layers = self._layers(model)
        fingerprint = model_fingerprint(model)
        probe_logits = None
        with torch.no_grad():
            probe_logits = model(x[:1])
        config = self._head_config(layers, int(probe_logits.shape[1]), x)
        key = hashlib.sha256(
            (fingerprint + json.dumps(config, sort_keys=True, default=str)).encode()
        ).hexdigest()
        if self._heads is not None and self._heads_key == key:
            return self._heads, layer, layers
        heads, _ = self._build_heads(model, layers, x)
        path = (self.cache_dir or default_cache_dir()) / f"{key[:40]}.pt"
        info: dict[str, Any] = {"cache_file": str(path), "layers": layers}
        loaded = False
        if path.exists():
            try:
                state = torch.load(path, map_location=x.device, weights_only=True)
                if state.get("key") == key:
                    heads.load_state_dict(state["heads"])
                    info.update(state.get("info") or {})
                    loaded = True
            except (RuntimeError, OSError, KeyError, EOFError) as err:  # a corrupt file: train afresh
                info["cache_error"] = f"{type(err).__name__}: {err}"
        if not loaded:
            images, aug = self._training_images(x)
            with attack_mode(model, "eval"):
                info.update(self.train_heads(model, heads, layers, images, aug))
            self.heads_trained += 1
            saved = {"key": key, "config": json.loads(json.dumps(config, default=str)), "info": dict(info),
                     "heads": heads.state_dict()}  # fmt: skip
            atomic_write(path, lambda tmp: torch.save(saved, tmp))
        heads.eval()
        for p in heads.parameters():
            p.requires_grad_(False)
        info["from_cache"] = loaded
        self._heads, self._heads_key, self._head_info = heads, key, info
        return heads, layer, layers

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
        heads, layer, _ = self.heads_for(model, x)
        head = heads[_key(layer)]
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
            "heads": dict(self._head_info),
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
            "head_epochs": self.head_epochs,
            "head_samples": self.head_samples,
            "head_data": self.head_data if isinstance(self.head_data, str) else "tensor",
            "batch_size": self.batch_size,
            "seed": self.seed,
            "bn_mode": self.bn_mode,
        }


def _key(layer: str) -> str:
    # ModuleDict keys cannot contain dots.
    return layer.replace(".", "__")
