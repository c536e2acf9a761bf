"""The analysis inputs: clean test images and adversarial ones crafted by the suite's attacks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from robust_train.attacks import Attack
from robust_train.data import to_float
from robust_train.metrics import float_batches


def craft_adversarial(
    model: nn.Module, attack: Attack, x: torch.Tensor, y: torch.Tensor, batch_size: int, desc: str = ""
) -> torch.Tensor:
    """attack(model, x, y) over batches (the whole set at once for attacks that batch internally)."""
    step = x.shape[0] if getattr(attack, "whole_set", False) else batch_size
    out = []
    total = math.ceil(x.shape[0] / max(1, step))
    for i, xb in tqdm(
        float_batches(x, step), total=total, desc=desc, leave=False, disable=not desc, unit="batch"
    ):
        out.append(attack(model, xb, y[i : i + step]).detach())
    return torch.cat(out) if out else x.new_zeros((0, *x.shape[1:]), dtype=torch.float32)


def analysis_inputs(
    model: nn.Module,
    wanted: Sequence[str],
    attacks: Mapping[str, Attack],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({name: float inputs} for 'clean' and each wanted suite attack, [wanted names not in the suite])."""
    inputs: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name in dict.fromkeys(wanted):
        if name == "clean":
            inputs[name] = to_float(x) if x.dtype == torch.uint8 else x
        elif name in attacks:
            inputs[name] = craft_adversarial(
                model, attacks[name], x, y, batch_size, f"analysis {name}" if progress else ""
            )
        else:
            skipped.append(name)
    return inputs, skipped
