"""Adversarial weight perturbation (Wu et al. 2020), docs/methods/awp.md, as a reusable component.

Any base defense can switch it on (`defense.awp.enabled=true`); ISEAT reuses it with its own size rule.
Per step, after x_adv is crafted on the unperturbed model:

1. a proxy copy of the model (same weights and BN buffers, train mode) evaluates the defense's own
   outer loss; its gradient w.r.t. each perturbed tensor gives the direction
   v_l = ||w_l|| * g_l / ||g_l|| (the proxy SGD step of the reference code reduces to this, since
   the per-layer renormalization cancels the proxy learning rate);
2. the model's tensors become w_l + gamma * v_l for the outer forward, backward and optimizer step;
3. afterwards the perturbation is removed: w_new = w_l + (update computed at the perturbed point).

The proxy keeps the main model's BatchNorm statistics untouched. Perturbed tensors: parameters with
more than one dimension and 'weight' in the name (all convolution kernels and the final linear
weight; not BN parameters or biases).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from robust_train.config import to_float


def perturbed_parameter_names(model: nn.Module) -> list[str]:
    """Names of the tensors AWP perturbs (docs/methods/awp.md#perturbed-tensors)."""
    return [n for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n]


class AWP:
    """The weight-perturbation stage of a step: `with awp.weight_perturbation(model, loss_fn): step()`."""

    name = "awp"

    def __init__(self, gamma: float, warmup_epochs: int = 0, eps: float = 1e-20) -> None:
        self.gamma = float(gamma)
        self.warmup_epochs = int(warmup_epochs)
        self.eps = eps
        self.epoch = 0
        # A copy of the model holding its weights and buffers; created once, reloaded every step.
        self.proxy_module: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> AWP | None:
        """An AWP from a `defense.awp` node, or None when it is absent or disabled."""
        if not cfg or not cfg.get("enabled", False):
            return None
        return cls(to_float(cfg.get("gamma", 0.01), "defense.awp.gamma"), int(cfg.get("warmup_epochs", 0)))

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def active(self) -> bool:
        # gamma <= 0 disables AWP, as in the reference code.
        return self.gamma > 0 and self.epoch >= self.warmup_epochs

    def proxy(self, model: nn.Module) -> nn.Module:
        """The proxy, reloaded with the model's current weights and buffers, in train mode."""
        if self.proxy_module is None:
            self.proxy_module = copy.deepcopy(model)
        self.proxy_module.load_state_dict(model.state_dict())
        self.proxy_module.train()
        return self.proxy_module

    def directions(
        self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """v_l = ||w_l|| * grad_l / ||grad_l|| of `loss_fn(proxy)` for every perturbed tensor."""
        proxy = self.proxy(model)
        names = perturbed_parameter_names(proxy)
        params = dict(proxy.named_parameters())
        grads = torch.autograd.grad(loss_fn(proxy), [params[n] for n in names], allow_unused=True)
        weights = dict(model.named_parameters())
        out = {}
        for name, g in zip(names, grads):
            w = weights[name].detach()
            if g is None:
                g = torch.zeros_like(w)
            out[name] = g * (w.norm() / (g.norm() + self.eps))
        return out

    @contextmanager
    def weight_perturbation(
        self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Perturb the model for the body of the block; remove the perturbation on exit (also on error)."""
        if not self.active:
            yield {}
            return
        v = self.directions(model, loss_fn)
        weights = dict(model.named_parameters())
        originals, perturbed = {}, {}
        with torch.no_grad():
            for name, direction in v.items():
                p = weights[name]
                originals[name] = p.detach().clone()
                perturbed[name] = originals[name] + self.gamma * direction
                p.copy_(perturbed[name])
        try:
            yield v
        finally:
            with torch.no_grad():
                for name in v:
                    p = weights[name]
                    # Keep only the optimizer's update: bit-exact restore when no step was taken.
                    p.copy_(originals[name] + (p - perturbed[name]))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", self.epoch))
