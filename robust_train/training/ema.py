"""Weight averaging: an exponential moving average (EMA) of the trained weights, kept beside them.

The recipe of Gowal et al. 2020 ("Uncovering the limits of adversarial training against norm-bounded
adversarial examples"), Rebuffi et al. 2021 ("Fixing data augmentation to improve adversarial
robustness") and Wang et al. 2023 (DM-Improves-AT, `train-wa.py`): after every optimizer step

    ema <- d * ema + (1 - d) * w,   d = min(decay, (1 + n) / (10 + n))

with `n` the number of averaging updates made before this one (0 at the first), so the average
forgets the random initialization within a few steps and reaches `decay` after (10 * decay - 1) /
(1 - decay) updates (1,790 at 0.995). DM-AT's code counts its first update as n = 1 (first d = 2/11);
we follow the formula with n = 0 (first d = 1/10). `start` is DM-AT's `warmup_steps` (2.5% of the run
in train-wa.py): before it the average copies the weights (d = 0) and `n` stays at 0.

BatchNorm running statistics are not averaged by default (`buffers: copy`): the averaged network uses
the trained network's current statistics, as DM-AT's `update_bn` does (it aliases the buffers). So the
per-step cost is one fused multi-tensor lerp over the parameters; `buffers: average` adds a second one
over the floating-point buffers (running mean and variance).

The update never reads a device value: the decay is a python float computed from a host counter, so a
step adds no host sync. The averaged tensors are fp32 whatever the parameters' dtype (bf16 autocast
keeps fp32 parameters anyway; a bf16 model is averaged in fp32).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from robust_train.errors import CheckpointError
from robust_train.registry import NODE_SCHEMAS
from robust_train.schema import Flag, Number, Schema, validate_node

# Checkpoint keys. last.pt and best.pt keep the trained weights under `model` and the average under
# EMA_KEY; ema.pt keeps the average under `model` and says so with WEIGHTS_KEY. EVAL_WEIGHTS_KEY names
# the weights a checkpoint is evaluated with by default (best.pt of an EMA run: the average).
EMA_KEY = "ema"
WEIGHTS_KEY = "weights"
EVAL_WEIGHTS_KEY = "eval_weights"
WEIGHT_CHOICES = ("auto", "trained", "ema")


class EMAConfig(Schema):
    """The top-level `ema` node: an exponential moving average of the weights (training/ema.py)."""

    enabled: Flag = False
    # Per optimizer step. 0.995: DM-Improves-AT train-wa.py `--tau` (Wang et al. 2023, batch 512-1024)
    # and Gowal et al. 2020; Rebuffi et al. 2021 use 0.999. Fewer, larger steps want a smaller decay.
    decay: Annotated[Number, Field(ge=0, lt=1)] = 0.995
    # d = min(decay, (1 + n) / (10 + n)), n = averaging updates so far; false: d = decay from the start.
    warmup: Flag = True
    # Fraction of the run's training steps during which the average copies the weights (d = 0) before
    # averaging starts; DM-Improves-AT train-wa.py uses 0.025 (its `warmup_steps`).
    start: Annotated[Number, Field(ge=0, lt=1)] = 0.0
    # copy: the average uses the trained model's BatchNorm statistics (DM-AT's update_bn); average: the
    # floating-point buffers are averaged like the weights (num_batches_tracked is copied).
    buffers: Literal["copy", "average"] = "copy"
    # Evaluate the average at the end of training as checkpoint kind `ema` (ema.pt), beside
    # eval.checkpoints (best.pt of an EMA run is evaluated with its averaged weights in any case).
    evaluate: Flag = True


NODE_SCHEMAS["ema"] = EMAConfig


def warmup_decay(decay: float, n: int) -> float:
    """min(decay, (1 + n) / (10 + n)): the decay of the (n + 1)-th averaging update."""
    return min(decay, (1.0 + n) / (10.0 + n))


class EMA:
    """An fp32 exponential moving average of `model`'s parameters (and, on request, float buffers).

    The trainer calls `update()` after each optimizer step, `applied()` around validation, and saves
    `state_dict()` in last.pt and best.pt; `weights()` is the model's state_dict with the averaged
    tensors in place of the trained ones (ema.pt, evaluation).
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.995,
        warmup: bool = True,
        start: float = 0.0,
        buffers: Literal["copy", "average"] = "copy",
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.model = model
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.start = float(start)
        self.buffer_rule = buffers
        named: list[tuple[str, torch.Tensor]] = [
            (n, p) for n, p in model.named_parameters() if p.is_floating_point()
        ]
        if buffers == "average":
            named += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.names = [n for n, _ in named]
        self.sources: list[torch.Tensor] = [t for _, t in named]
        self.averaged: list[torch.Tensor] = []
        # Averaging updates made so far: a host integer, so the decay needs no device read.
        self.updates = 0
        # Updates that copy the weights before averaging starts (`start`); known once the trainer
        # knows the run's length (`plan`).
        self.copy_until: int | None = 0 if self.start == 0 else None
        self._cast = any(t.dtype != torch.float32 for t in self.sources)
        self.reset()

    @classmethod
    def from_config(cls, node: Any, model: nn.Module) -> EMA | None:
        """The average selected by the `ema` node; None when it is absent or disabled."""
        cfg = node if isinstance(node, EMAConfig) else validate_node(EMAConfig, node or {}, "ema")
        if not cfg.enabled:
            return None
        return cls(model, cfg.decay, cfg.warmup, cfg.start, cfg.buffers)

    def reset(self) -> None:
        """Start the average from the model's current weights, with the warm-up from its beginning."""
        with torch.no_grad():
            self.averaged = [t.detach().to(torch.float32, copy=True) for t in self.sources]
        self.updates = 0

    def plan(self, total_steps: int) -> None:
        """Fix the copy phase (`start` x the run's training steps) once the run's length is known."""
        if self.copy_until is None:
            self.copy_until = int(round(self.start * total_steps))

    def current_decay(self) -> float:
        """The decay the next `update()` uses (0.0 while copying)."""
        copy_until = self.copy_until or 0
        if self.updates < copy_until:
            return 0.0
        if not self.warmup:
            return self.decay
        return warmup_decay(self.decay, self.updates - copy_until)

    def update(self) -> None:
        """ema <- d * ema + (1 - d) * w for every tensor, as one fused multi-tensor lerp; no host sync."""
        weight = 1.0 - self.current_decay()
        with torch.no_grad():
            sources: list[torch.Tensor] = [t.float() for t in self.sources] if self._cast else self.sources
            torch._foreach_lerp_(self.averaged, sources, weight)
        self.updates += 1

    # ----------------------------------------------------------------- weights
    def weights(self) -> OrderedDict[str, torch.Tensor]:
        """The model's state_dict with the averaged tensors (fp32) in place of the trained ones."""
        state: OrderedDict[str, torch.Tensor] = OrderedDict(self.model.state_dict())
        for name, tensor in zip(self.names, self.averaged, strict=True):
            if name in state:
                state[name] = tensor.detach()
        return state

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights inside the model for the block (validation); the trained ones after.

        The trained tensors are copied aside and copied back bit for bit, also when the block raises.
        """
        with torch.no_grad():
            saved = [t.detach().clone() for t in self.sources]
            torch._foreach_copy_(self.sources, self.averaged)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.sources, saved)

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "tensors": dict(zip(self.names, self.averaged, strict=True)),
            "updates": self.updates,
            "copy_until": self.copy_until,
            "decay": self.decay,
            "warmup": self.warmup,
            "buffers": self.buffer_rule,
        }

    def load_state_dict(self, state: Mapping[str, Any], where: str = "the checkpoint") -> None:
        tensors = state.get("tensors") or {}
        if set(tensors) != set(self.names):
            missing = sorted(set(self.names) - set(tensors))[:3]
            extra = sorted(set(tensors) - set(self.names))[:3]
            raise CheckpointError(
                f"the EMA weights in {where} do not fit this model (missing {missing}, unexpected {extra}"
                f"; ema.buffers was {state.get('buffers')!r}, now {self.buffer_rule!r})"
            )
        with torch.no_grad():
            for name, target in zip(self.names, self.averaged, strict=True):
                target.copy_(tensors[name])
        self.updates = int(state["updates"])
        copy_until = state.get("copy_until")
        self.copy_until = None if copy_until is None else int(copy_until)
        if self.copy_until is None and self.start == 0:
            self.copy_until = 0


def checkpoint_weights(
    state: Mapping[str, Any], choice: str = "auto", where: str | Path = "the checkpoint"
) -> tuple[dict[str, Any], str]:
    """The state_dict to evaluate from a robust-train checkpoint, and which weights it is.

    `auto` takes the checkpoint's own rule (best.pt of an EMA run: the average; ema.pt: the average it
    holds; anything else: the trained weights); `trained` and `ema` ask for one explicitly. Returns
    (state_dict, "trained" | "ema").
    """
    if choice not in WEIGHT_CHOICES:
        raise ValueError(f"weights={choice!r} is not allowed; choose one of: {', '.join(WEIGHT_CHOICES)}")
    holds = state.get(WEIGHTS_KEY) or "trained"  # what `model` is: ema.pt holds the average there
    if choice == "auto":
        choice = state.get(EVAL_WEIGHTS_KEY) or holds
    if choice == holds:
        return dict(state["model"]), holds
    if choice == "trained":
        raise CheckpointError(
            f"checkpoint={where} holds only the averaged (EMA) weights; the trained weights are in "
            "last.pt and best.pt of the same run"
        )
    averaged = state.get(EMA_KEY)
    if not isinstance(averaged, Mapping) or not isinstance(averaged.get("tensors"), Mapping):
        raise CheckpointError(
            f"checkpoint={where} holds no averaged weights (trained with ema.enabled=false); "
            "use weights=trained or weights=auto"
        )
    merged = dict(state["model"])
    for name, tensor in averaged["tensors"].items():
        if name in merged:
            merged[name] = tensor
    return merged, "ema"


def with_weights(entry: Mapping[str, Any], which: str) -> dict[str, Any]:
    """An evaluation entry of results.json with `weights: trained|ema` placed after its `checkpoint`."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key != WEIGHTS_KEY:
            out[key] = value
        if key == "checkpoint":
            out[WEIGHTS_KEY] = which
    out.setdefault(WEIGHTS_KEY, which)
    return out
