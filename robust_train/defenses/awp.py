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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from robust_train.schema import Flag, Integer, Number, Schema


class AWPConfig(Schema):
    """`defense.awp`: the weight perturbation of AT-AWP, TRADES-AWP and MART-AWP (docs/methods/awp.md)."""

    enabled: Flag = False
    # Relative radius of the perturbation, ||v_l|| = gamma * ||w_l||; 0 switches it off.
    gamma: Annotated[Number, Field(ge=0, le=1)] = 0.01
    # Epochs (0-indexed) trained without the perturbation before it switches on.
    warmup_epochs: Annotated[Integer, Field(ge=0)] = 0


def perturbed_parameter_names(model: nn.Module) -> list[str]:
    """Names of the tensors AWP perturbs (docs/methods/awp.md#perturbed-tensors)."""
    return [n for n, p in model.named_parameters() if p.dim() > 1 and "weight" in n]


@contextmanager
def offset_weights(
    model: nn.Module,
    deltas: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    keep_update: bool = True,
) -> Iterator[None]:
    """The named parameters become w + delta inside the block; on exit (also on error) the offset is
    removed: w_new = w + (what the block changed at the offset point) with `keep_update`, else exactly w.

    Shared by every weight perturbation (AWP's and ISEAT's v around the outer step, RWT's noise around
    the attack): the restore is bit-exact when nothing was updated inside the block. `deltas` may be a
    generator of (name, delta) pairs, so that no second copy of all offsets is held during the block.
    """
    weights = dict(model.named_parameters())
    originals: dict[str, torch.Tensor] = {}
    perturbed: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, delta in deltas.items() if isinstance(deltas, Mapping) else deltas:
            p = weights[name]
            originals[name] = p.detach().clone()
            offset = originals[name] + delta
            if keep_update:
                perturbed[name] = offset
            p.copy_(offset)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                p = weights[name]
                # Keep only the optimizer's update: bit-exact restore when no step was taken.
                p.copy_(original + (p - perturbed[name]) if keep_update else original)


class AWP:
    """Adversarial weight perturbation, a contributor to the step's weight-perturbation stage.

    `weight_perturbation(model, x, y, x_adv, base_loss)` is the stage's one contract (add-ons such as
    ISEAT implement the same hook); `perturb(model, loss_fn)` is the mechanism underneath.
    """

    name = "awp"

    def __init__(self, gamma: float, warmup_epochs: int = 0, eps: float = 1e-20) -> None:
        self.gamma = float(gamma)
        self.warmup_epochs = int(warmup_epochs)
        self.eps = eps
        self.epoch = 0
        # A copy of the model holding its weights and buffers; created once, reloaded every step.
        self.proxy_module: nn.Module | None = None

    @classmethod
    def from_config(cls, cfg: AWPConfig | Mapping[str, Any] | None) -> AWP | None:
        """An AWP from a `defense.awp` node, or None when it is absent or disabled."""
        if cfg is None:
            return None
        if not isinstance(cfg, AWPConfig):
            from robust_train.schema import validate_node

            cfg = validate_node(AWPConfig, cfg, "defense.awp")
        if not cfg.enabled:
            return None
        return cls(cfg.gamma, cfg.warmup_epochs)

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
    def perturb(
        self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Perturb the model for the body of the block (yields v); remove the perturbation on exit."""
        if not self.active:
            yield {}
            return
        v = self.directions(model, loss_fn)
        with offset_weights(model, ((name, self.gamma * d) for name, d in v.items())):
            yield v

    def weight_perturbation(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor | None,
        base_loss: Callable[[nn.Module], torch.Tensor],
    ) -> Any:
        """The step's weight-perturbation hook: v from the base outer loss, around the outer step."""
        return self.perturb(model, base_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", self.epoch))
