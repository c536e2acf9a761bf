"""One training step: the base defense plus add-ons, composed in the fixed order of `addons/base.py`.

The step knows no method by name. Weight perturbations come from one list of contributors with one
hook (`weight_perturbation(model, x, y, x_adv, base_loss)`): the defense's own (AWP) first, then the
add-ons'. The outer loss is the base's `StepLoss` (named, weighted terms) plus, add-on by add-on in
config order, each add-on's items: a tensor is added as a term, a `Reweight` changes the weight of one
of the base's terms; both are logged as `<add-on>/<key>` with the amount they added.

The step never reads a value back to the host: it returns detached device tensors that the trainer
accumulates and reads once per logging interval.

Fast path (`FastPath`, README "Performance"): forwards run under bf16 autocast when `amp` is on (the attack's
objective, the clean reference, weight-perturbation proxies and the outer forwards); gradients are
taken outside autocast. The attack's delta and x_adv stay fp32 in [0, 1]: autocast casts only inside
the model's matmuls and convolutions, and the gradient w.r.t. the fp32 input comes back in fp32.
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
from robust_train.step_types import CleanReference, Reweight, StepForwards
from robust_train.training.fastpath import FastPath


class TrainStep:
    """Callable `(x, y) -> metrics` running attack, outer forward/backward and the optimizer step."""

    def __init__(
        self,
        model: nn.Module,
        defense: Defense,
        optimizer: torch.optim.Optimizer,
        addons: Sequence[Addon] = (),
        fast: FastPath | None = None,
    ) -> None:
        self.model = model
        # Default: the plain fp32 eager path (bit-identical to a step without any fast-path code).
        self.fast = fast or FastPath()
        self.defense = defense
        self.optimizer = optimizer
        self.addons = list(addons)
        self.layers = list(dict.fromkeys(name for a in self.addons for name in a.required_layers()))

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> Objective:
        """The base inner loss plus every add-on's per-example term, from one forward per attack step."""
        clean = CleanReference(x, self.layers)
        defense, addons, layers, fast = self.defense, self.addons, self.layers, self.fast

        def combined(model: nn.Module, x_adv: torch.Tensor) -> torch.Tensor:
            # Only the forward and the loss run under autocast; the attack differentiates outside it.
            with fast.autocast():
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
            # Full-precision per-example losses: restarts compare them; the sum's gradient seeds backward.
            return fast.full_precision(total)

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
        x = self.fast.prepare_input(x)
        x_adv = self.craft(x, y)
        self.model.train()
        contexts = [a.forward_context for a in self.addons]
        fast = self.fast

        def base_loss(module: nn.Module) -> torch.Tensor:
            # A perturbation search's forwards (AWP's proxy): not the outer step's (outer_step=False).
            with fast.autocast():
                out = StepForwards(module, x, y, x_adv, self.layers, contexts)
                return fast.full_precision(self.defense.outer_loss(out).total())

        perturbations = [*self.defense.weight_perturbations(), *self.addons]
        with ExitStack() as stack:
            with fast.autocast():
                # Weight perturbations are entered under autocast because their own forwards (proxy
                # losses, ISEAT's references) are training forwards; the gradients they take inside run
                # in the dtypes those forwards saved. They stay open through backward and the update.
                for contributor in perturbations:
                    stack.enter_context(contributor.weight_perturbation(self.model, x, y, x_adv, base_loss))
                out = StepForwards(self.model, x, y, x_adv, self.layers, contexts, outer_step=True)
                result = self.defense.outer_loss(out)
                loss = result.total()
                terms = result.logged()
                for addon in self.addons:
                    for key, item in addon.outer_loss(out, result).items():
                        term = result.contribution(item) if isinstance(item, Reweight) else item
                        loss = loss + term
                        terms[f"{addon.name}/{key}"] = term.detach()
                loss = fast.full_precision(loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        correct = (result.logits.detach().argmax(1) == y).sum()
        return {"loss": loss.detach(), "correct": correct, **terms}
