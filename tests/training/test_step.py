"""The training-step pipeline: PGD-AT and standard steps against hand-written computations."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from robust_train.addons.base import Addon
from robust_train.attacks import ThreatModel
from robust_train.defenses import build_defense
from robust_train.step_types import LABEL, Reweight, StepForwards, StepLoss, Term
from robust_train.training.schedule import lr_at
from robust_train.training.step import TrainStep

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 3


def _defense(name: str, bn_mode: str = "train"):
    attack = None
    if name == "pgd_at":
        attack = {"name": "pgd", "steps": STEPS, "step": ALPHA, "restarts": 1,
                  "random_start": "uniform", "bn_mode": bn_mode}  # fmt: skip
    return build_defense(OmegaConf.create({"name": name, "attack": attack}), ThreatModel("linf", EPS))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def test_pgd_at_step_matches_hand_computation(tiny_model, batch) -> None:
    x, y = batch
    model_a, model_b = tiny_model.double(), copy.deepcopy(tiny_model).double()
    x = x.double()
    step = TrainStep(model_a, _defense("pgd_at"), _sgd(model_a))
    torch.manual_seed(11)
    metrics = step(x, y)

    # By hand: uniform start, sign steps with train-mode BN, CE on x_adv in train mode, SGD.
    torch.manual_seed(11)
    model_b.train()
    delta = ((2 * torch.rand(x.shape, dtype=x.dtype) - 1) * EPS).clamp(-x, 1 - x)
    for _ in range(STEPS):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model_b(x + delta), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + ALPHA * g.sign()).clamp(-EPS, EPS).clamp(-x, 1 - x)
    x_adv = (x + delta).clamp(0, 1)
    logits = model_b(x_adv)
    loss = F.cross_entropy(logits, y)
    model_b.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model_b.parameters():
            p -= 0.1 * (p.grad + 5e-4 * p)  # first momentum step: buffer = gradient

    torch.testing.assert_close(metrics["loss"], loss.detach())
    assert int(metrics["correct"]) == int((logits.argmax(1) == y).sum())
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        torch.testing.assert_close(pa, pb, msg=name)


def test_standard_step_is_clean_ce(tiny_model, batch) -> None:
    x, y = batch
    ref = copy.deepcopy(tiny_model)
    step = TrainStep(tiny_model, _defense("standard"), _sgd(tiny_model))
    metrics = step(x, y)
    ref.train()
    loss = F.cross_entropy(ref(x), y)
    torch.testing.assert_close(metrics["loss"], loss.detach())
    assert step.defense.attack is None


def test_step_returns_device_tensors_without_host_values(tiny_model, batch) -> None:
    x, y = batch
    metrics = TrainStep(tiny_model, _defense("pgd_at"), _sgd(tiny_model))(x, y)
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())


class _CountingAddon(Addon):
    """Records the order of hook calls and adds a zero-strength term."""

    name = "counter"

    def __init__(self, log: list[str]) -> None:
        self.log = log  # no config or context needed for this probe

    def attack_context(self, model, x, y):
        self.log.append("attack_context")
        return super().attack_context(model, x, y)

    def inner_objective(self, x_adv, y, logits_adv, feats_adv, clean, model, base_term):
        self.log.append("inner_objective")
        assert logits_adv.shape == (x_adv.shape[0], 10) and base_term.shape == (x_adv.shape[0],)
        return torch.zeros(x_adv.shape[0])

    def weight_perturbation(self, model, x, y, x_adv, base_loss):
        self.log.append("weight_perturbation")
        return super().weight_perturbation(model, x, y, x_adv, base_loss)

    def forward_context(self, out, branch):
        self.log.append(f"forward:{branch}")
        return super().forward_context(out, branch)

    def outer_loss(self, out: StepForwards, base):
        self.log.append("outer_loss")
        assert base.label_term is not None
        return {"zero": 0.0 * out.logits("adv").sum()}


def test_addon_hooks_run_in_order_and_a_zero_addon_is_the_base_step(tiny_model, batch) -> None:
    x, y = batch
    ref = copy.deepcopy(tiny_model)
    log: list[str] = []
    torch.manual_seed(0)
    m1 = TrainStep(tiny_model, _defense("pgd_at"), _sgd(tiny_model), [_CountingAddon(log)])(x, y)
    torch.manual_seed(0)
    m2 = TrainStep(ref, _defense("pgd_at"), _sgd(ref))(x, y)
    assert log[0] == "attack_context"
    assert log[-3:] == ["weight_perturbation", "forward:adv", "outer_loss"]
    assert log.count("inner_objective") == STEPS
    torch.testing.assert_close(m1["loss"], m2["loss"])
    for pa, pb in zip(tiny_model.parameters(), ref.parameters()):
        torch.testing.assert_close(pa, pb)


class _ReweightingAddon(Addon):
    """Scales the base's label term by (1 + change) and adds nothing else."""

    name = "reweighting"

    def __init__(self, change: float, term: str = LABEL) -> None:
        self.change, self.term = change, term

    def outer_loss(self, out: StepForwards, base):
        return {"label_scale": Reweight(self.term, self.change)}


@pytest.mark.parametrize("term", [LABEL, "ce_adv"])
def test_a_reweight_changes_one_base_term_by_role_or_name(tiny_model, batch, term) -> None:
    """`Reweight(term, change)` adds exactly `change * weight * value` of the named (or role-marked) term."""
    x, y = batch
    x_adv = (x + 0.01).clamp(0, 1)
    out = StepForwards(tiny_model.train(), x, y, x_adv)
    base = _defense("pgd_at").outer_loss(out)
    assert set(base.terms) == {"ce_adv"} and base.label is base.terms["ce_adv"]
    added = base.contribution(Reweight(term, -0.25))
    assert torch.equal(added, -0.25 * base.terms["ce_adv"].value)
    # A weighted term: the change scales its weight, w -> w * (1 + change).
    weighted = StepLoss(logits=base.logits, terms={"t": Term(base.total(), weight=3.0, role=LABEL)})
    assert torch.equal(weighted.contribution(Reweight(LABEL, -0.5)), (-0.5 * 3.0) * base.total())


def test_the_step_applies_reweights_in_order_and_logs_what_they_add(tiny_model, batch) -> None:
    x, y = batch
    ref = copy.deepcopy(tiny_model)
    torch.manual_seed(0)
    m1 = TrainStep(tiny_model, _defense("pgd_at"), _sgd(tiny_model), [_ReweightingAddon(-0.3)])(x, y)
    torch.manual_seed(0)
    m2 = TrainStep(ref, _defense("pgd_at"), _sgd(ref))(x, y)
    # The base loss is CE(x'), so the step minimizes (1 - 0.3) * CE; the loss is summed in this order.
    assert torch.equal(m1["loss"], m2["loss"] + (-0.3) * m2["loss"])
    assert torch.equal(m1["reweighting/label_scale"], (-0.3) * m2["ce_adv"])
    # Removing the only term (change -1) leaves a zero loss and no update beyond weight decay.
    model = copy.deepcopy(ref)
    torch.manual_seed(0)
    m3 = TrainStep(
        model, _defense("pgd_at"), torch.optim.SGD(model.parameters(), lr=0.1), [_ReweightingAddon(-1.0)]
    )(x, y)
    assert float(m3["loss"]) == 0.0
    assert all(torch.equal(pa, pb) for pa, pb in zip(model.parameters(), ref.parameters()))


class _Perturbation:
    """A weight-perturbation contributor that only records when it is entered and left."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    @contextmanager
    def weight_perturbation(self, model, x, y, x_adv, base_loss):
        self.log.append(f"enter:{self.name}")
        yield
        self.log.append(f"exit:{self.name}")


class _PerturbingAddon(_CountingAddon):
    name = "perturbing"

    @contextmanager
    def weight_perturbation(self, model, x, y, x_adv, base_loss):
        self.log.append("enter:addon")
        assert torch.isfinite(base_loss(copy.deepcopy(model)))  # the base outer loss of another module
        yield
        self.log.append("exit:addon")


def test_weight_perturbations_are_one_list_defense_first_then_addons(tiny_model, batch, monkeypatch) -> None:
    """AWP is an ordinary contributor: the defense's perturbations enter first, the add-ons' after, all
    through the same hook, and all stay open through the optimizer step."""
    x, y = batch
    log: list[str] = []
    defense = _defense("pgd_at")
    monkeypatch.setattr(defense, "weight_perturbations", lambda: [_Perturbation("defense", log)])
    optimizer = _sgd(tiny_model)
    real_step = optimizer.step

    def step(*args, **kwargs):
        log.append("optimizer.step")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", step)
    TrainStep(tiny_model, defense, optimizer, [_PerturbingAddon(log)])(x, y)
    order = [e for e in log if e.startswith(("enter", "exit", "optimizer"))]
    assert order == ["enter:defense", "enter:addon", "optimizer.step", "exit:addon", "exit:defense"]
    awp = _defense_with_awp()
    assert awp.weight_perturbations() == [awp.awp] and _defense("pgd_at").weight_perturbations() == []


def _defense_with_awp():
    attack = {"name": "pgd", "steps": STEPS, "step": ALPHA, "restarts": 1, "random_start": "uniform",
              "bn_mode": "train"}  # fmt: skip
    cfg = {"name": "pgd_at", "attack": attack, "awp": {"enabled": True, "gamma": 0.01}}
    return build_defense(OmegaConf.create(cfg), ThreatModel("linf", EPS))


def test_forward_state_is_per_forwards_object(tiny_model, batch) -> None:
    """What a forward context stores for the outer loss lives in that step's `StepForwards` only."""
    x, y = batch
    seen = []

    @contextmanager
    def capture(out, branch):
        out.state["probe", branch] = branch
        seen.append(out.outer_step)
        yield

    a = StepForwards(tiny_model, x, y, x.clone(), forward_contexts=[capture], outer_step=True)
    b = StepForwards(tiny_model, x, y, x.clone(), forward_contexts=[capture])
    a.logits("adv")
    b.logits("clean")
    assert a.state == {("probe", "adv"): "adv"} and b.state == {("probe", "clean"): "clean"}
    assert seen == [True, False]


def test_shared_forwards_run_each_branch_once(tiny_model, batch) -> None:
    x, y = batch
    out = StepForwards(tiny_model, x, y, x.clone())
    out.logits("adv")
    out.logits("adv")
    out.logits("clean")
    assert out.forward_passes == 2


def test_piecewise_schedule_per_epoch_and_per_iteration() -> None:
    cfg = {"name": "piecewise", "milestones": [100, 150], "gamma": 0.1, "per_iteration": False}
    assert lr_at(cfg, 0.1, 200, 99, 389, 390) == 0.1
    assert abs(lr_at(cfg, 0.1, 200, 100, 0, 390) - 0.01) < 1e-12
    assert abs(lr_at(cfg, 0.1, 200, 150, 0, 390) - 0.001) < 1e-12
    # Rice et al.: the drop takes effect at the last iteration of epoch 99.
    cfg["per_iteration"] = True
    assert lr_at(cfg, 0.1, 200, 99, 388, 390) == 0.1
    assert abs(lr_at(cfg, 0.1, 200, 99, 389, 390) - 0.01) < 1e-12


def test_cosine_and_warmup_schedules() -> None:
    cos = {"name": "cosine", "per_iteration": False}
    assert lr_at(cos, 0.1, 10, 0, 0, 5) == 0.1
    assert abs(lr_at(cos, 0.1, 10, 5, 0, 5) - 0.05) < 1e-12
    warm = {"name": "constant", "warmup_epochs": 2}
    assert abs(lr_at(warm, 0.1, 10, 0, 4, 10) - 0.025) < 1e-12
    assert lr_at(warm, 0.1, 10, 2, 0, 10) == 0.1
