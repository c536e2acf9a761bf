"""LAFEAT's latent heads (docs/methods/lafeat.md#heads): training and the disk cache, apart from the attack.

Small conv heads read intermediate feature maps of the *frozen* model and learn to predict the model's
own prediction `argmax f(x)` (not the ground truth), with Adam and a cosine schedule. The attack
(robust_train.attacks.lafeat) receives a heads source, `source(model, x, layers) -> LatentHeads`:

- `HeadCache(settings)` returns the heads for the model's weights from memory, else from the disk cache,
  else trains them and writes the cache. The cache file is keyed by a hash of the model's state_dict and
  of every head setting, so a second evaluation of the same weights loads them instead of training.
  The directory is `$ROBUST_TRAIN_CACHE/lafeat` (see `default_cache_dir`).
- `LatentHeads` is a trained set; it is also a source of itself, for heads trained elsewhere.

Training data (`HeadSettings.data`): the official code trains the heads on the training set with the
training augmentation, so the default is `train`: the training split of the dataset node in
`HeadSettings.dataset` (the run's `${dataset}` in the presets), with that dataset's crop/flip settings.
`attacked` trains on the images under attack instead (no training set needed: for tests and quick
checks; the labels are still the model's predictions, never ground truth). A uint8 NCHW tensor trains
on those images. `samples` and `epochs` bound the cost on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from robust_train.attacks.base import attack_mode
from robust_train.errors import ConfigError
from robust_train.io import atomic_write
from robust_train.models.features import forward_with_features

HEAD_DATA = ("train", "attacked")
# Dataset keys that do not change the training split: another test_limit or data root reuses the heads.
_NOT_TRAIN_SPLIT = ("test_limit", "root", "download", "check_integrity")


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


def head_key(layer: str) -> str:
    """The ModuleDict key of a layer's head (ModuleDict keys cannot contain dots)."""
    return layer.replace(".", "__")


class LatentHeads:
    """Trained heads by layer name, with where they came from (`info`, reported by the attack).

    A fixed set of heads is also a heads source: calling it returns itself when it has every layer
    asked for.
    """

    def __init__(
        self, modules: nn.ModuleDict, layers: Sequence[str], info: Mapping[str, Any] | None = None
    ) -> None:
        self.modules = modules
        self.layers = list(layers)
        self.info: dict[str, Any] = dict(info or {})

    def __getitem__(self, layer: str) -> nn.Module:
        return self.modules[head_key(layer)]

    def __call__(self, model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> LatentHeads:
        missing = [name for name in layers if name not in self.layers]
        if missing:
            raise ConfigError(f"lafeat: no trained head for layer(s) {', '.join(missing)}")
        return self

    def describe(self) -> dict[str, Any]:
        return {"head_data": "given"}


class HeadSource(Protocol):
    """What the attack receives: the trained heads on `layers` of `model` (x: the images under attack)."""

    def __call__(self, model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> LatentHeads: ...

    def describe(self) -> dict[str, Any]: ...


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


@dataclass(frozen=True, eq=False)
class HeadSettings:
    """How the heads are trained (docs/methods/lafeat.md#heads); each setting is part of the cache key.

    The names in messages are the config keys (`lafeat.head_epochs`); `seed` is the attack's seed, which
    also draws the heads' initial weights and the training order.
    """

    epochs: int = 100
    samples: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    channels: int = 64
    hidden: int = 256
    augment: bool = True
    data: str | torch.Tensor = "train"
    dataset: Mapping[str, Any] | None = None
    data_seed: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        _positive_int(self.epochs, "lafeat.head_epochs", 0)
        if self.samples is not None:
            _positive_int(self.samples, "lafeat.head_samples")
        _positive_int(self.batch_size, "lafeat.head_batch_size")
        if not float(self.lr) > 0:
            raise ConfigError(f"lafeat.head_lr={self.lr!r} must be > 0")
        object.__setattr__(self, "lr", float(self.lr))
        _positive_int(self.channels, "lafeat.head_channels")
        _positive_int(self.hidden, "lafeat.head_hidden")
        object.__setattr__(self, "augment", bool(self.augment))
        if isinstance(self.data, torch.Tensor):
            if self.data.dtype != torch.uint8 or self.data.dim() != 4:
                raise ConfigError("lafeat.head_data as a tensor must hold uint8 NCHW images")
        elif self.data not in HEAD_DATA:
            raise ConfigError(
                f"lafeat.head_data={self.data!r} is not allowed; choose one of: {', '.join(HEAD_DATA)}"
            )
        elif self.data == "train" and not self.dataset:
            raise ConfigError(
                "lafeat.head_data=train needs lafeat.head_dataset (the dataset node, `${dataset}` in the "
                "presets); or set lafeat.head_data=attacked"
            )
        object.__setattr__(self, "dataset", dict(self.dataset) if self.dataset else None)
        object.__setattr__(self, "data_seed", int(self.data_seed))
        object.__setattr__(self, "seed", int(self.seed))

    def key_config(self, layers: Sequence[str], num_classes: int, x_attacked: torch.Tensor) -> dict[str, Any]:
        """Everything the trained heads depend on besides the weights (hashed into the cache key)."""
        if isinstance(self.data, torch.Tensor):
            data: Any = {"tensor": list(self.data.shape), "sum": int(self.data.sum(dtype=torch.int64))}
        elif self.data == "train":
            node = {k: v for k, v in (self.dataset or {}).items() if k not in _NOT_TRAIN_SPLIT}
            data = {"dataset": node, "seed": self.data_seed}
        else:
            # Heads fit to other images are other heads: the attacked set is part of the key.
            data = {"attacked": list(x_attacked.shape), "sum": float(x_attacked.double().sum())}
        return {
            "layers": list(layers),
            "num_classes": num_classes,
            "channels": self.channels,
            "hidden": self.hidden,
            "epochs": self.epochs,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "augment": self.augment,
            "seed": self.seed,
            "data": data,
        }

    def training_images(self, x_attacked: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """uint8 images for head training, on the attacked images' device, and their augmentation."""
        aug = {"pad": 4, "flip": False, "padding_mode": "zero"}
        if isinstance(self.data, torch.Tensor):
            images = self.data
        elif self.data == "attacked":
            images = (x_attacked.detach() * 255).round().clamp(0, 255).to(torch.uint8)
        else:
            from robust_train.data import build_dataset  # attacks -> data is a downward import

            node = self.dataset or {}
            images = build_dataset(node, self.data_seed).train_x
            aug = {
                "pad": int(node.get("crop_pad", 4) or 0),
                "flip": bool(node.get("flip", True)),
                "padding_mode": str(node.get("padding_mode") or "zero"),
            }
        if self.samples is not None:
            images = images[: self.samples]
        if images.shape[0] == 0:
            raise ConfigError("lafeat: no images to train the latent heads on")
        return images.to(x_attacked.device), aug

    def describe(self) -> dict[str, Any]:
        return {
            "head_epochs": self.epochs,
            "head_samples": self.samples,
            "head_data": self.data if isinstance(self.data, str) else "tensor",
        }


def new_heads(
    model: nn.Module, layers: Sequence[str], x: torch.Tensor, settings: HeadSettings
) -> tuple[nn.ModuleDict, int]:
    """Untrained heads sized from the model's features on x[:1], drawn from `settings.seed`."""
    with torch.no_grad():
        logits, feats = forward_with_features(model, x[:1], layers, detach=True)
    num_classes = int(logits.shape[1])
    if num_classes < 2:
        raise ConfigError("lafeat needs at least 2 classes (its margins use the top-2 logits)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        modules = nn.ModuleDict(
            {
                head_key(name): LatentHead(
                    feats[name].shape[1:], num_classes, settings.channels, settings.hidden
                )
                for name in layers
            }
        )
    return modules.to(device=x.device, dtype=x.dtype), num_classes


def train_heads(
    model: nn.Module,
    heads: nn.ModuleDict,
    layers: Sequence[str],
    images: torch.Tensor,
    aug: Mapping[str, Any],
    settings: HeadSettings,
) -> dict[str, Any]:
    """Fit the heads to the frozen model's predictions: sum of CE over heads, Adam, cosine
    (docs/methods/lafeat.md#heads).

    The model runs under no_grad with frozen parameters (the caller puts it in eval mode); only the
    heads learn. Returns the heads' agreement with the model (%) in the last epoch and the cost.
    """
    from robust_train.data import augment_batch, to_float

    opt = torch.optim.Adam(heads.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(settings.epochs, 1), eta_min=1e-5)
    gen = torch.Generator().manual_seed(settings.seed)
    n = images.shape[0]
    agree: dict[str, Any] = {name: 0 for name in layers}
    forwards, start = 0, time.perf_counter()
    heads.train()
    # Head training is the slow part of a first LAFEAT evaluation (100 epochs over the training set).
    bar = tqdm(range(settings.epochs), desc="lafeat heads", unit="epoch", leave=False, dynamic_ncols=True)
    for _ in bar:
        perm = torch.randperm(n, generator=gen).to(images.device)
        # Agreement counts stay on the device: one host read per epoch, not one per batch.
        agree = {name: torch.zeros((), dtype=torch.long, device=images.device) for name in layers}
        for i in range(0, n, settings.batch_size):
            xb = images[perm[i : i + settings.batch_size]]
            if settings.augment:
                xb = augment_batch(xb, aug["pad"], aug["flip"], aug["padding_mode"], generator=gen)
            else:
                xb = to_float(xb)
            with torch.no_grad():
                logits, feats = forward_with_features(model, xb, layers, detach=True)
            forwards += 1
            labels = logits.argmax(1)
            loss = torch.zeros((), device=xb.device)
            for name in layers:
                out = heads[head_key(name)](feats[name])
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


class HeadCache:
    """The heads source of a configured LAFEAT: memory, then the disk cache, then training.

    `trained` counts the head trainings this source ran (loads from disk or memory do not count);
    `last` is the set it returned most recently.
    """

    def __init__(self, settings: HeadSettings, cache_dir: str | Path | None = None) -> None:
        self.settings = settings
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.trained = 0
        self.last: LatentHeads | None = None
        self._last_key: str | None = None

    def describe(self) -> dict[str, Any]:
        return self.settings.describe()

    def __call__(self, model: nn.Module, x: torch.Tensor, layers: Sequence[str]) -> LatentHeads:
        layers = list(layers)
        fingerprint = model_fingerprint(model)
        with torch.no_grad():
            num_classes = int(model(x[:1]).shape[1])
        config = self.settings.key_config(layers, num_classes, x)
        key = hashlib.sha256(
            (fingerprint + json.dumps(config, sort_keys=True, default=str)).encode()
        ).hexdigest()
        if self.last is not None and self._last_key == key:
            return self.last
        modules, _ = new_heads(model, layers, x, self.settings)
        path = (self.cache_dir or default_cache_dir()) / f"{key[:40]}.pt"
        info: dict[str, Any] = {"cache_file": str(path), "layers": layers}
        loaded = False
        if path.exists():
            try:
                state = torch.load(path, map_location=x.device, weights_only=True)
                if state.get("key") == key:
                    modules.load_state_dict(state["heads"])
                    info.update(state.get("info") or {})
                    loaded = True
            except (RuntimeError, OSError, KeyError, EOFError) as err:  # a corrupt file: train afresh
                info["cache_error"] = f"{type(err).__name__}: {err}"
        if not loaded:
            images, aug = self.settings.training_images(x)
            with attack_mode(model, "eval"):
                info.update(train_heads(model, modules, layers, images, aug, self.settings))
            self.trained += 1
            saved = {"key": key, "config": json.loads(json.dumps(config, default=str)), "info": dict(info),
                     "heads": modules.state_dict()}  # fmt: skip
            atomic_write(path, lambda tmp: torch.save(saved, tmp))
        modules.eval()
        for p in modules.parameters():
            p.requires_grad_(False)
        info["from_cache"] = loaded
        self.last, self._last_key = LatentHeads(modules, layers, info), key
        return self.last
