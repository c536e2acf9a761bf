"""Shared forward passes of one training step.

Every loss term of a step (the base defense's and each add-on's) reads logits and tapped features
from one `StepForwards`, so each forward runs at most once per step (DESIGN.md §5). Layers that any
term will need are declared up front; the first request of a branch then captures all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack

import torch
from torch import nn

from robust_train.models.features import forward_with_features


class StepForwards:
    """Lazily computed, cached forwards of the clean and adversarial batch in the current model mode."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor | None,
        layers: Iterable[str] = (),
        forward_contexts: Iterable[Callable[[nn.Module, str, torch.Tensor], AbstractContextManager]] = (),
    ) -> None:
        self.model = model
        # Entered around every forward of this step (add-ons that change how a forward runs, e.g. LAD).
        self.forward_contexts = list(forward_contexts)
        self.x = x
        self.y = y
        self.x_adv = x_adv
        self.layers = list(dict.fromkeys(layers))
        self._logits: dict[str, torch.Tensor] = {}
        self._features: dict[str, dict[str, torch.Tensor]] = {}
        self.forward_passes = 0

    def _run(self, branch: str) -> None:
        if branch in self._logits:
            return
        if branch == "adv":
            if self.x_adv is None:
                raise RuntimeError("this defense crafted no adversarial batch; there is no 'adv' forward")
            inp = self.x_adv
        else:
            inp = self.x
        with ExitStack() as stack:
            for make in self.forward_contexts:
                stack.enter_context(make(self.model, branch, inp))
            if self.layers:
                logits, feats = forward_with_features(self.model, inp, self.layers)
            else:
                logits, feats = self.model(inp), {}
        self.forward_passes += 1
        self._logits[branch] = logits
        self._features[branch] = feats

    def logits(self, branch: str) -> torch.Tensor:
        """Logits of 'clean' or 'adv' inputs, with gradient, computed once."""
        self._run(branch)
        return self._logits[branch]

    def features(self, branch: str) -> dict[str, torch.Tensor]:
        """Tapped features (the declared layers) of the 'clean' or 'adv' forward."""
        self._run(branch)
        return self._features[branch]


class CleanReference:
    """The clean batch's logits and tapped features for the attack stage, computed once without gradient.

    Computed lazily at the first request, which happens inside the attack (so in the attack's BN mode);
    shared by the base defense's inner loss (TRADES' target) and every add-on's inner term.
    """

    def __init__(self, x: torch.Tensor, layers: Iterable[str] = ()) -> None:
        self.x = x
        self.layers = list(dict.fromkeys(layers))
        self._logits: torch.Tensor | None = None
        self._features: dict[str, torch.Tensor] = {}

    def _run(self, model: nn.Module) -> None:
        if self._logits is None:
            # A reference forward must not move BatchNorm running statistics (it would when the attack
            # runs BN in train mode): snapshot and restore them.
            saved = [
                (buf, buf.clone())
                for m in model.modules()
                if m.training
                for _, buf in m.named_buffers(recurse=False)
            ]
            with torch.no_grad():
                if self.layers:
                    self._logits, self._features = forward_with_features(
                        model, self.x, self.layers, detach=True
                    )
                else:
                    self._logits = model(self.x)
                for buf, copy in saved:
                    # Through .data, like BatchNorm's own running-stat update: no autograd version bump,
                    # so graphs of earlier forwards that saved these buffers stay valid.
                    buf.data.copy_(copy)

    def logits(self, model: nn.Module) -> torch.Tensor:
        self._run(model)
        assert self._logits is not None
        return self._logits

    def features(self, model: nn.Module) -> dict[str, torch.Tensor]:
        self._run(model)
        return self._features
