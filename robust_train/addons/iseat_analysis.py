"""ISEAT's analysis measures (docs/methods/iseat.md#analysis): AV statistics and the margin along a direction.

Pure functions for a later analysis tool to call; they are not part of the training step. (The
per-epoch instance-wise AV tracker that would use `av_statistics` is a separate piece of work.)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from robust_train.attacks import attack_mode


def av_statistics(av: torch.Tensor, fraction: float = 0.1) -> dict[str, float]:
    """Eq. 5 and Table 1's columns for adversarial vulnerabilities AV_i = CE(x'_i) - CE(x_i).

    sd: population std (ddof 0); top/bottom: mean of the round(fraction*n) largest/smallest values;
    high/low: percentage of examples with AV >= 1 / AV <= 0.
    """
    av = av.detach().double().flatten()
    n = av.numel()
    k = max(1, int(round(fraction * n)))
    ordered = torch.sort(av).values
    return {
        "sd": float(av.std(unbiased=False)),
        "top": float(ordered[-k:].mean()),
        "bottom": float(ordered[:k].mean()),
        "high_pct": 100.0 * float((av >= 1).double().mean()),
        "low_pct": 100.0 * float((av <= 0).double().mean()),
    }


@torch.no_grad()
def margin_along_direction(
    model: nn.Module,
    x: torch.Tensor,
    direction: torch.Tensor,
    mu_max: float = 50.0,
    grid_step: float = 0.1,
    refine_steps: int = 20,
    bn_mode: str = "eval",
) -> torch.Tensor:
    """Eq. 6: per example, the smallest mu >= 0 with F(clip01(x + mu * d/||d||_2)) != F(x), capped at mu_max.

    A grid of spacing `grid_step` finds the first flipped point; bisection between it and the previous
    grid point refines mu to grid_step / 2**refine_steps. Examples that never flip get mu_max.
    """
    with attack_mode(model, bn_mode):
        shape = (-1,) + (1,) * (x.dim() - 1)
        d = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
        pred = model(x).argmax(1)

        def flipped(mu: torch.Tensor) -> torch.Tensor:
            return model((x + mu.view(shape) * d).clamp(0, 1)).argmax(1) != pred

        n = x.shape[0]
        hi = torch.full((n,), math.inf, dtype=x.dtype, device=x.device)
        found = torch.zeros(n, dtype=torch.bool, device=x.device)
        n_grid = math.ceil(mu_max / grid_step)
        for k in range(1, n_grid + 1):
            mu = torch.full((n,), min(k * grid_step, mu_max), dtype=x.dtype, device=x.device)
            new = flipped(mu) & ~found
            hi = torch.where(new, mu, hi)
            found |= new
            if bool(found.all()):
                break
        lo = (hi - grid_step).clamp_min(0)
        for _ in range(refine_steps):
            mid = (lo + hi) / 2
            f = flipped(torch.where(found, mid, torch.zeros_like(mid))) & found
            hi = torch.where(f, mid, hi)
            lo = torch.where(f, lo, mid)
        return torch.where(found, hi, torch.full_like(hi, mu_max))
