"""Runs a suite of attacks on a model and reports robust accuracy per attack, with timings."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from robust_train.attacks import Attack, ThreatModel, build_attack
from robust_train.data import to_float


def build_suite(eval_cfg: Mapping[str, Any], threat: ThreatModel) -> dict[str, Attack]:
    """The attacks of an `eval` config, in order; entries set to null are dropped."""
    attacks: dict[str, Attack] = {}
    for name, node in (eval_cfg.get("attacks") or {}).items():
        if node is not None:
            attacks[str(name)] = build_attack(node, threat, key=f"eval.attacks.{name}")
    return attacks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_accuracy(
    model: nn.Module,
    attack: Attack,
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    progress: bool = False,
    desc: str = "",
) -> dict[str, Any]:
    """Accuracy (%) of `model` on `attack(model, x, y)` over a uint8 dataset already on the model's device."""
    device = x_uint8.device
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    attack.forward_passes = attack.backward_passes = 0
    _sync(device)
    start = time.perf_counter()
    n = x_uint8.shape[0]
    starts = range(0, n, batch_size)
    bar = tqdm(starts, desc=desc, leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    try:
        for i in bar:
            x = to_float(x_uint8[i : i + batch_size])
            yb = y[i : i + batch_size]
            x_adv = attack(model, x, yb)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == yb).sum()
    finally:
        model.train(was_training)
        bar.close()
    _sync(device)
    elapsed = time.perf_counter() - start
    return {
        "accuracy": 100.0 * correct.item() / max(n, 1),
        "n": n,
        "time_s": round(elapsed, 3),
        "forward_passes": attack.forward_passes,
        "backward_passes": attack.backward_passes,
        "attack": attack.describe(),
    }


def run_suite(
    model: nn.Module,
    attacks: Mapping[str, Attack],
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    progress: bool = True,
    label: str = "",
) -> dict[str, dict[str, Any]]:
    """Every attack of the suite on the same examples; results keyed by the suite's attack names."""
    results = {}
    for name, attack in attacks.items():
        desc = f"eval {label} {name}".strip()
        results[name] = evaluate_accuracy(model, attack, x_uint8, y, batch_size, progress, desc)
    return results
