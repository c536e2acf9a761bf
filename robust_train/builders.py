"""Turn config nodes into objects: model, optimizer, threat model, fast path.

Each builder validates its node with the node's schema first (a DictConfig, a plain dict or the schema
object itself is accepted), so the objects are built from checked values and the schema's defaults.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robust_train.attacks import ThreatModel, build_threat
from robust_train.data import DataBundle
from robust_train.models import build_model, check_model
from robust_train.schema import raise_problems, validate_node
from robust_train.training.fastpath import FastPath, build_sgd
from robust_train.training.trainer import OptimizerConfig


def model_from_config(model_cfg: Any, data: DataBundle | None = None, **meta: Any) -> nn.Module:
    """Build the model of `model_cfg` for a dataset's classes and normalization.

    Pass `data`, or `num_classes`, `mean` and `std` (as stored in a checkpoint).
    """
    cfg, problems = check_model(model_cfg)
    raise_problems(problems)
    assert cfg is not None
    num_classes = data.num_classes if data is not None else int(meta["num_classes"])
    mean = data.mean if data is not None else tuple(meta["mean"])
    std = data.std if data is not None else tuple(meta["std"])
    return build_model(cfg.name, num_classes=num_classes, mean=mean, std=std, **cfg.options())


def threat_from_config(threat_cfg: Any) -> ThreatModel:
    return build_threat(threat_cfg)


def optimizer_from_config(
    opt_cfg: Any, model: nn.Module, device: torch.device, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD with momentum, optional Nesterov, weight decay on every parameter
    (docs/methods/README.md#training-recipe).

    `fused` (the fast path's `fused_sgd`) asks for the fused kernel, else the foreach one.
    """
    cfg = validate_node(OptimizerConfig, opt_cfg, "trainer.optimizer")
    return build_sgd(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
        fused=fused,
    )


def fast_path_from_config(fast_cfg: Any, device: torch.device | str) -> FastPath:
    """The resolved `trainer.fast` switches for `device` (every knob at its default if the node is absent)."""
    return FastPath.from_config(fast_cfg, device)
