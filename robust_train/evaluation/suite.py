"""Runs a suite of attacks on a model and reports robust accuracy per attack, with timings."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from tqdm import tqdm

from robust_train.attacks import Attack, ThreatModel, build_attack
from robust_train.data import to_float


@runtime_checkable
class ResumableAttack(Protocol):
    """An attack that keeps its progress in `state_path` (None: no state file)."""

    state_path: Path | None


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
    # Attacks that batch internally (AutoAttack) get the whole set in one call.
    step = n if getattr(attack, "whole_set", False) else batch_size
    starts = range(0, n, max(step, 1))
    bar = tqdm(starts, desc=desc, leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    try:
        for i in bar:
            x = to_float(x_uint8[i : i + step])
            yb = y[i : i + step]
            x_adv = attack(model, x, yb)
            with torch.no_grad():
                for j in range(0, x_adv.shape[0], batch_size):
                    correct += (model(x_adv[j : j + batch_size]).argmax(1) == yb[j : j + batch_size]).sum()
    finally:
        model.train(was_training)
        bar.close()
    _sync(device)
    elapsed = time.perf_counter() - start
    result = {
        "accuracy": 100.0 * correct.item() / max(n, 1),
        "n": n,
        "time_s": round(elapsed, 3),
        "forward_passes": attack.forward_passes,
        "backward_passes": attack.backward_passes,
        "attack": attack.describe(),
    }
    report = getattr(attack, "report", None)
    if report:
        result["details"] = report
    return result


def run_suite(
    model: nn.Module,
    attacks: Mapping[str, Attack],
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    progress: bool = True,
    label: str = "",
    state_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Every attack of the suite on the same examples; results keyed by the suite's attack names."""
    results = {}
    for name, attack in attacks.items():
        desc = f"eval {label} {name}".strip()
        owned: ResumableAttack | None = None  # an attack whose state file this run creates and removes
        if state_dir is not None and isinstance(attack, ResumableAttack) and attack.state_path is None:
            # Long evaluations (AutoAttack) resume from this file if the run is interrupted.
            owned = attack
            owned.state_path = Path(state_dir) / f".{label or 'eval'}_{name}.state.pt"
        results[name] = evaluate_accuracy(model, attack, x_uint8, y, batch_size, progress, desc)
        if owned is not None and owned.state_path is not None:
            owned.state_path.unlink(missing_ok=True)
            owned.state_path = None
    return results
