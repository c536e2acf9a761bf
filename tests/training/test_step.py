"""The training-step pipeline: PGD-AT and standard steps against hand-written computations."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from robust_train.addons.base import Addon
from robust_train.attacks import ThreatModel
from robust_train.defenses import build_defense
from robust_train.training.forwards import StepForwards
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

    def forward_context(self, model, branch, x_in):
        self.log.append(f"forward:{branch}")
        return super().forward_context(model, branch, x_in)

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
