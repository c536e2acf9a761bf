"""The training fast path (README "Performance"): bf16 autocast, channels_last, torch.compile and fused SGD.

Every knob of `trainer.fast` takes `auto`, `true` or `false`. `auto` switches a knob on where it pays
off: on CUDA for autocast, channels_last and fused SGD; never for compile (its warm-up costs minutes
and it is worth it only for long runs). The fast path covers training and the attacks inside a step;
validation and the evaluation suite run in fp32 (low precision can mask gradients and overstate
robustness).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import BeforeValidator
from torch import nn

from robust_train.schema import Schema, validate_node

KNOBS = ("amp", "channels_last", "compile", "fused_sgd")
KNOB_VALUES = ("auto", "true", "false")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _knob(value: Any) -> Any:
    """auto | true | false; YAML gives booleans for true/false, the command line may give strings."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in KNOB_VALUES:
        raise ValueError(f"is not allowed; choose one of: {', '.join(KNOB_VALUES)}")
    return "auto" if text == "auto" else text == "true"


Knob = Annotated[bool | Literal["auto"], BeforeValidator(_knob)]


class FastConfig(Schema):
    """`trainer.fast`: each knob auto | true | false; auto = on for CUDA (compile: never)."""

    amp: Knob = "auto"  # bf16 autocast for the training forwards and the attack inside a step
    channels_last: Knob = "auto"  # model and batches in channels_last memory format
    compile: Knob = False  # torch.compile the model in place (minutes of warm-up)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = (
        "default"
    )
    fused_sgd: Knob = "auto"  # fused SGD kernel (foreach where fused is unsupported)


# `auto` turns these knobs on for these device types.
_AUTO_ON: dict[str, tuple[str, ...]] = {
    "amp": ("cuda",),
    "channels_last": ("cuda",),
    "compile": (),
    "fused_sgd": ("cuda",),
}


def knob_value(node: Any, key: str) -> str:
    """`trainer.fast.<key>` as one of auto/true/false (an absent node: every knob at its default)."""
    cfg = node if isinstance(node, FastConfig) else validate_node(FastConfig, node, "trainer.fast")
    value = getattr(cfg, key)
    return value if value == "auto" else ("true" if value else "false")


@dataclass(frozen=True)
class FastPath:
    """Resolved fast-path switches for one device. `FastPath()` is the plain fp32 eager path."""

    device_type: str = "cpu"
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: str = "default"
    fused_sgd: bool = False
    amp_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_config(cls, node: Any, device: torch.device | str) -> FastPath:
        """Resolve `trainer.fast` (a missing node means every knob `auto`) for `device`."""
        cfg = node if isinstance(node, FastConfig) else validate_node(FastConfig, node, "trainer.fast")
        device_type = torch.device(device).type
        on: dict[str, bool] = {}
        for key in KNOBS:
            value = getattr(cfg, key)
            on[key] = device_type in _AUTO_ON[key] if value == "auto" else bool(value)
        return cls(
            device_type=device_type,
            amp=on["amp"],
            channels_last=on["channels_last"],
            compile=on["compile"],
            compile_mode=cfg.compile_mode,
            fused_sgd=on["fused_sgd"],
        )

    def describe(self) -> dict[str, Any]:
        """The resolved switches, for logs and benchmark output."""
        return {
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp else False,
            "channels_last": self.channels_last,
            "compile": self.compile_mode if self.compile else False,
            "fused_sgd": self.fused_sgd,
        }

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast around forward passes when `amp` is on; a no-op context otherwise."""
        if not self.amp:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.amp_dtype)

    @staticmethod
    def full_precision(t: torch.Tensor) -> torch.Tensor:
        """A loss that autocast left in bf16/fp16, as fp32; fp32 and fp64 losses pass through untouched."""
        return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The batch in the memory format the model runs in (channels_last for 4-D images when on)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_model(self, model: nn.Module, backend: Any = None) -> nn.Module:
        """Convert `model` in place (channels_last) and compile it in place; returns the same object.

        In-place `nn.Module.compile` keeps parameter names and state_dict keys unchanged, so checkpoints,
        optimizers and add-ons that hold the model see no wrapper. `backend` overrides the compiler (tests
        pass a counting backend).
        """
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile:
            compile_model(model, mode=self.compile_mode, backend=backend)
        return model


def compile_model(model: nn.Module, mode: str = "default", backend: Any = None) -> None:
    """`model.compile()` in place, with enough cache entries for every mode a step switches through.

    A PGD step runs the model in several guard states (attack in train or eval BN mode with frozen
    parameters, the no-grad clean reference, the outer forward with trainable parameters, validation in
    eval mode): each compiles once and is then reused. The cache limit is raised so that none of them
    evicts another and falls back to eager.
    """
    import torch._dynamo

    limit_name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit_name, max(getattr(torch._dynamo.config, limit_name), 16))
    kwargs: dict[str, Any] = {"backend": backend} if backend is not None else {"mode": mode}
    model.compile(**kwargs)


def build_sgd(
    params: Any, lr: float, momentum: float, nesterov: bool, weight_decay: float, fused: bool
) -> torch.optim.Optimizer:
    """SGD; with `fused`, the fused kernel where this torch supports it on the parameters' device.

    Without fused support it falls back to the multi-tensor (foreach) implementation, the next fastest.
    """
    params = list(params)
    kwargs: dict[str, Any] = {
        "lr": lr,
        "momentum": momentum,
        "nesterov": nesterov,
        "weight_decay": weight_decay,
    }
    if not fused:
        return torch.optim.SGD(params, **kwargs)
    try:
        return torch.optim.SGD(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(params, foreach=True, **kwargs)
