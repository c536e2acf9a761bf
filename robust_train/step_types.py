"""The types one training step shares between the base defense, the add-ons and the step itself.

They sit below `defenses/`, `addons/` and `training/` (they import only torch and the model-feature
helper), so every layer that composes a step can use them without importing upward.

* `StepForwards`: the step's clean and adversarial forwards, each run at most once and shared by every
  loss term; `state` carries what one hook of the step hands to a later one (e.g. a tensor captured
  in a forward and read by the outer loss), so nothing is kept between steps or keyed by module.
* `CleanReference`: the clean batch's logits and features for the attack stage (no gradient).
* `Term` and `StepLoss`: the base defense's loss as named, weighted terms; the supervised one has the
  role `label`. `Reweight` is how an add-on changes the weight of one of those terms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from robust_train.models.features import forward_with_features

BRANCHES = ("clean", "adv")
# The role of the supervised label-fitting term of a base loss (CE, MART's boosted CE, ...).
LABEL = "label"

ForwardContext = Callable[["StepForwards", str], AbstractContextManager[Any]]


class StepForwards:
    """Lazily computed, cached forwards of the clean and adversarial batch in the current model mode.

    `forward_contexts` are entered around every forward (`make(self, branch)`), e.g. LAD's perturbed
    states or RWT's capture of the final layer's input. `outer_step` is True only for the forwards
    whose loss the optimizer minimizes; forwards of a weight-perturbation search (AWP's proxy) and
    standalone uses leave it False, so add-ons that change the trained forwards leave those alone.
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        x_adv: torch.Tensor | None,
        layers: Iterable[str] = (),
        forward_contexts: Iterable[ForwardContext] = (),
        outer_step: bool = False,
    ) -> None:
        self.model = model
        self.forward_contexts = list(forward_contexts)
        self.outer_step = outer_step
        self.x = x
        self.y = y
        self.x_adv = x_adv
        self.layers = list(dict.fromkeys(layers))
        # Per-step hand-over between hooks (forward contexts -> outer losses), keyed by the hook's owner
        # (e.g. `(addon, "tap")`, so two instances of one add-on do not collide); dies with the step.
        self.state: dict[Any, Any] = {}
        self._logits: dict[str, torch.Tensor] = {}
        self._features: dict[str, dict[str, torch.Tensor]] = {}
        self.forward_passes = 0

    def input(self, branch: str) -> torch.Tensor:
        """The batch a branch's forward reads: x for 'clean', x_adv for 'adv'."""
        if branch == "adv":
            if self.x_adv is None:
                raise RuntimeError("this defense crafted no adversarial batch; there is no 'adv' forward")
            return self.x_adv
        if branch != "clean":
            raise ValueError(f"unknown branch {branch!r}; allowed: {', '.join(BRANCHES)}")
        return self.x

    def _run(self, branch: str) -> None:
        if branch in self._logits:
            return
        inp = self.input(branch)
        with ExitStack() as stack:
            for make in self.forward_contexts:
                stack.enter_context(make(self, branch))
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


# A term recomputed from other logits of its branch: (logits, y) -> scalar.
TermFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Term:
    """One named part of a base loss: `weight * value`.

    `role` marks the supervised term (`LABEL`); `branch` is the forward it reads and `fn` recomputes it
    from other logits of that branch (LAD evaluates the label term on its perturbed forward with it).
    """

    value: torch.Tensor
    weight: float = 1.0
    role: str | None = None
    branch: str | None = None
    fn: TermFn | None = None

    def weighted(self) -> torch.Tensor:
        # A weight of 1 adds the value itself: the sum stays the expression the defense would write.
        return self.value if self.weight == 1.0 else self.weight * self.value


@dataclass(frozen=True)
class Reweight:
    """An add-on's change to one of the base's terms: its weight w becomes w * (1 + change).

    The step adds `(change * w) * value` after the base loss, where the add-on lists it: `change=-1`
    removes a term (before adding a replacement), `change=-eta` scales it by (1 - eta). Written as a
    change rather than a new weight so the arithmetic is exactly `loss + (-eta) * term` and not
    `loss + ((1 - eta) - 1) * term`, which rounds differently.
    """

    term: str  # a term name of the base's StepLoss, or a role (`label`)
    change: float


@dataclass
class StepLoss:
    """A base loss as named terms, the logits its accuracy is read from, and the total.

    `loss` is the sum of the weighted terms in their order (computed here when not given).
    """

    logits: torch.Tensor
    terms: dict[str, Term] = field(default_factory=dict)
    loss: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.loss is None:
            total: torch.Tensor | None = None
            for term in self.terms.values():
                total = term.weighted() if total is None else total + term.weighted()
            if total is None:
                raise ValueError("a StepLoss needs at least one term")
            self.loss = total

    def total(self) -> torch.Tensor:
        assert self.loss is not None
        return self.loss

    def find(self, key: str) -> tuple[str, Term]:
        """(name, term) of the term named `key`, or else of the term whose role is `key`."""
        if key in self.terms:
            return key, self.terms[key]
        for name, term in self.terms.items():
            if term.role == key:
                return name, term
        raise KeyError(f"the base loss has no term named or marked {key!r}; terms: {', '.join(self.terms)}")

    @property
    def label(self) -> Term | None:
        """The supervised term (role `label`), or None when the base declares none."""
        return next((t for t in self.terms.values() if t.role == LABEL), None)

    @property
    def label_term(self) -> torch.Tensor | None:
        """The supervised term's value (with gradient)."""
        term = self.label
        return None if term is None else term.value

    def contribution(self, change: Reweight) -> torch.Tensor:
        """What a `Reweight` adds to the loss: (change * weight) * value of the named term."""
        _, term = self.find(change.term)
        factor = change.change if term.weight == 1.0 else change.change * term.weight
        return factor * term.value

    def logged(self) -> dict[str, torch.Tensor]:
        """Each term's (unweighted) value, detached, for the step's metrics."""
        return {name: term.value.detach() for name, term in self.terms.items()}
