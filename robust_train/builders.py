"""Turn validated config nodes into objects: model, optimizer, threat model, fast path."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robust_train.attacks import ThreatModel, build_threat
from robust_train.config import to_float
from robust_train.data import DataBundle
from robust_train.models import build_model
from robust_train.training.fastpath import FastPath, build_sgd


def model_from_config(model_cfg: Any, data: DataBundle | None = None, **meta: Any) -> nn.Module:
    """Build the model of `model_cfg` for a dataset's classes and normalization.

    Pass `data`, or `num_classes`, `mean` and `std` (as stored in a checkpoint).
    """
    num_classes = data.num_classes if data is not None else int(meta["num_classes"])
    mean = data.mean if data is not None else tuple(meta["mean"])
    std = data.std if data is not None else tuple(meta["std"])
    extra = {k: v for k, v in dict(model_cfg).items() if k not in ("name", "width", "normalize")}
    return build_model(
        str(model_cfg["name"]),
        num_classes=num_classes,
        mean=mean,
        std=std,
        width=float(model_cfg.get("width", 1.0)),
        normalize=str(model_cfg.get("normalize", "meanstd")),
        **extra,
    )


def threat_from_config(threat_cfg: Any) -> ThreatModel:
    return build_threat(threat_cfg)


def optimizer_from_config(
    opt_cfg: Any, model: nn.Module, device: torch.device, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD with momentum, optional Nesterov, weight decay on every parameter
    (docs/methods/README.md#training-recipe).

    `fused` (the fast path's `fused_sgd`) asks for the fused kernel, else the foreach one.
    """
    return build_sgd(
        model.parameters(),
        lr=to_float(opt_cfg["lr"], "trainer.optimizer.lr"),
        momentum=to_float(opt_cfg.get("momentum", 0.0), "trainer.optimizer.momentum"),
        nesterov=bool(opt_cfg.get("nesterov", False)),
        weight_decay=to_float(opt_cfg.get("weight_decay", 0.0), "trainer.optimizer.weight_decay"),
        fused=fused,
    )


def fast_path_from_config(fast_cfg: Any, device: torch.device | str) -> FastPath:
    """The resolved `trainer.fast` switches for `device` (every knob `auto` when the node is absent)."""
    return FastPath.from_config(fast_cfg, device)
