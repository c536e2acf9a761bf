"""One training step: the base defense plus add-ons, composed in the fixed order of `addons/base.py`.

The step never reads a value back to the host: it returns detached device tensors that the trainer
accumulates and reads once per logging interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import nn

from robust_train.addons.base import Addon
from robust_train.attacks import Objective
from robust_train.defenses.base import Defense
from robust_train.models.features import forward_with_features
from robust_train.training.forwards import CleanReference, StepForwards


class TrainStep:
    """Callable `(x, y) -> metrics` running attack, outer forward/backward and the optimizer step."""

    def __init__(
        self,
        model: nn.Module,
        defense: Defense,
        optimizer: torch.optim.Optimizer,
        addons: Sequence[Addon] = (),
    ) -> None:
        self.model = model
        self.defense = defense
        self.optimizer = optimizer
        self.addons = list(addons)
        self.layers = list(dict.fromkeys(name for a in self.addons for name in a.required_layers()))

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> Objective:
        """The base inner loss plus every add-on's per-example term, from one forward per attack step."""
        clean = CleanReference(x, self.layers)
        defense, addons, layers = self.defense, self.addons, self.layers

        def combined(model: nn.Module, x_adv: torch.Tensor) -> torch.Tensor:
            if layers:
                logits, feats = forward_with_features(model, x_adv, layers)
            else:
                logits, feats = model(x_adv), {}
            base = defense.inner_loss(logits, y, clean, model)
            total = base
            for addon in addons:
                extra = addon.inner_objective(x_adv, y, logits, feats, clean, model, base)
                if extra is not None:
                    total = total + extra
            return total

        return combined

    def craft(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Stages 2-3: the adversarial batch under every add-on's attack context."""
        if self.defense.attack is None:
            return None
        with ExitStack() as stack:
            for addon in self.addons:
                stack.enter_context(addon.attack_context(self.model, x, y))
            return self.defense.craft(self.model, x, y, self.objective(x, y))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        x_adv = self.craft(x, y)
        self.model.train()
        contexts = [a.forward_context for a in self.addons]

        def base_loss(module: nn.Module) -> torch.Tensor:
            return self.defense.outer_loss(StepForwards(module, x, y, x_adv, self.layers, contexts)).loss

        with ExitStack() as stack:
            if self.defense.awp is not None:
                stack.enter_context(self.defense.awp.weight_perturbation(self.model, base_loss))
            for addon in self.addons:
                stack.enter_context(addon.weight_perturbation(self.model, x, y, x_adv, base_loss))
            out = StepForwards(self.model, x, y, x_adv, self.layers, contexts)
            result = self.defense.outer_loss(out)
            loss = result.loss
            terms = dict(result.terms)
            for addon in self.addons:
                for key, term in addon.outer_loss(out, result).items():
                    loss = loss + term
                    terms[f"{addon.name}/{key}"] = term.detach()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        correct = (result.logits.detach().argmax(1) == y).sum()
        return {"loss": loss.detach(), "correct": correct, **terms}
