"""Threat models: the perturbation set (norm ball intersected with the [0,1] box).

Attack loops only ask a threat model for a random start, a steepest-ascent step and a projection, so a
new norm never touches the loops (README "Layout").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from robust_train.errors import ConfigError
from robust_train.schema import ThreatConfig, step_above_eps

__all__ = ["ThreatConfig", "ThreatModel", "step_above_eps"]

_TINY = 1e-10  # keeps the L2 step direction finite where a gradient is exactly zero


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped to broadcast against t."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball of radius `eps` (pixel units) around each clean image, inside the [0,1] box."""

    norm: str
    eps: float

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2"):
            raise ConfigError(f"threat.norm={self.norm!r} is not allowed; choose one of: linf, l2")
        if self.eps < 0:
            raise ConfigError(f"threat.eps={self.eps} is out of range: allowed 0 <= value")

    def box(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Clip delta so that x + delta stays in [0, 1]."""
        return torch.maximum(torch.minimum(delta, 1 - x), -x)

    def random_init(
        self, x: torch.Tensor, kind: str = "uniform", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The starting perturbation of an attack loop (docs/methods/pgd.md#threat-model,
        docs/methods/trades.md#training-attack, docs/methods/mart.md#training-attack).

        `uniform` (Madry) is projected onto the ball and clipped to the box, as robust_overfitting does.
        `normal` is TRADES'/MART's 0.001*N(0, I), returned as drawn: the official codes take the first
        gradient at x + 0.001*N(0, I) without clipping it to [0, 1] (nor to the ball), so pixels at 0 or
        1 start outside the box; every step after it projects and clips as usual.
        """
        if kind == "none" or self.eps == 0:
            return torch.zeros_like(x)
        if kind == "normal":
            return 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if kind == "uniform":
            if self.norm == "linf":
                u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                delta = (2 * u - 1) * self.eps
            else:
                g = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                r = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device)
                delta = g / (_per_example_norm(g) + _TINY) * r.to(x.dtype) * self.eps
        else:
            raise ConfigError(f"random_start={kind!r} is not allowed; choose one of: uniform, normal, none")
        return self.project(delta, x)

    def ascent_direction(self, grad: torch.Tensor) -> torch.Tensor:
        """The steepest-ascent direction of unit norm for this norm (sign for Linf)."""
        if self.norm == "linf":
            return grad.sign()
        return grad / (_per_example_norm(grad) + _TINY)

    def project(self, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project onto the ball, then clip to the box (the order of the reference codes)."""
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = _per_example_norm(delta)
            delta = delta * torch.clamp(self.eps / (norms + _TINY), max=1.0)
        return self.box(delta, x)

    def step(self, delta: torch.Tensor, grad: torch.Tensor, alpha: float, x: torch.Tensor) -> torch.Tensor:
        """One projected steepest-ascent step of size alpha."""
        return self.project(delta + alpha * self.ascent_direction(grad), x)
