"""TRADES' and MART's training attacks and steps against hand-written copies of the official loops
(docs/methods/trades.md#loss, docs/methods/trades.md#training-attack, docs/methods/mart.md#training-attack,
docs/methods/mart.md#loss): the 0.001*N(0, I) start, taken unclipped, then step, ball, box.

Float64 and a smooth tiny model with BatchNorm, so every comparison holds to rounding and a sign flip can
only come from a real difference. Many pixels sit exactly at 0 or 1, where a clipped start would differ.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from robust_train.attacks import ThreatModel
from robust_train.defenses import build_defense
from robust_train.training.step import TrainStep

# The official CIFAR-10 scripts' values (train_trades_cifar10.py, MART train_wideresnet.py).
EPS, ALPHA, STEPS, BETA = 0.031, 0.007, 10, 6.0
SEED = 123
ATOL = 1e-12


class _Recorder(nn.Module):
    """A tiny smooth CNN with BatchNorm that records every input it is called on."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.fc(torch.tanh(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _model() -> _Recorder:
    model = _Recorder().double()
    # Non-trivial running statistics, so eval-mode BN differs from batch statistics.
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    model.train()
    return model


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64)
    u = torch.rand(x.shape, generator=g, dtype=torch.float64)
    x[u < 0.3] = 0.0
    x[u > 0.7] = 1.0
    x[0], x[1] = 0.0, 1.0
    y = torch.randint(0, 10, (6,), generator=g)
    return x, y


def _defense(name: str, steps: int = STEPS):
    cfg = {"name": name, "beta": BETA,
           "attack": {"name": "pgd", "steps": steps, "step": ALPHA, "restarts": 1,
                      "random_start": "normal", "bn_mode": "eval"}}  # fmt: skip
    return build_defense(OmegaConf.create(cfg), ThreatModel("linf", EPS))


# --------------------------------------------------------------------------- official loops, by hand
def _trades_grad_loss(
    model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")


def _mart_grad_loss(model: nn.Module, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x_adv), y)


OFFICIAL_LOSS: dict[str, Callable[..., torch.Tensor]] = {"trades": _trades_grad_loss, "mart": _mart_grad_loss}


def _official_attack(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = STEPS
) -> torch.Tensor:
    """yaodongyu/TRADES trades_loss / YisenWang/MART mart_loss, L-inf branch (global RNG, as they draw)."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, dtype=x.dtype).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = OFFICIAL_LOSS[name](model, x_adv, x, y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + ALPHA * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0).detach()


def _official_outer_loss(name: str, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor):
    """The official outer losses, forwards in the official order (train mode)."""
    if name == "trades":
        loss_natural = F.cross_entropy(model(x), y)
        loss_robust = F.kl_div(
            F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum"
        )
        return loss_natural + BETA * loss_robust / x.shape[0]
    logits, logits_adv = model(x), model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    return loss_adv + BETA * (kl * (1.0000001 - true_probs)).sum() / x.shape[0]


def _attack_points(seen: list[torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """The inputs a loop differentiated at: every recorded forward except the clean batch's."""
    return [s for s in seen if not torch.equal(s, x)]


# --------------------------------------------------------------------------- the start itself
@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
def test_normal_start_is_the_raw_draw_neither_projected_nor_clipped(batch, norm, eps) -> None:
    x, _ = batch
    delta = ThreatModel(norm, eps).random_init(x, "normal", torch.Generator().manual_seed(SEED))
    expected = 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(SEED), dtype=x.dtype)
    assert torch.equal(delta, expected)
    start = x + delta
    assert (start < 0).any() and (start > 1).any()


# --------------------------------------------------------------------------- attacks vs official loops
# 10 steps of 0.007 saturate most pixels at the ball or the box; after 3, x_adv still shows the start.
@pytest.mark.parametrize("steps", [STEPS, 3])
@pytest.mark.parametrize("name", ["trades", "mart"])
def test_training_attack_matches_official_loop(batch, name, steps) -> None:
    x, y = batch
    ours_model, ref_model = _model(), _model()
    step = TrainStep(ours_model, _defense(name, steps), torch.optim.SGD(ours_model.parameters(), lr=0.1))
    torch.manual_seed(SEED)
    x_adv = step.craft(x, y)
    torch.manual_seed(SEED)
    expected = _official_attack(name, ref_model, x, y, steps)

    ours_points = _attack_points(ours_model.seen, x)
    ref_points = _attack_points(ref_model.seen, x)
    assert len(ours_points) == len(ref_points) == steps
    # The first gradient is taken at x + 0.001*N(0, I) as drawn, outside [0, 1] where x is 0 or 1.
    assert (ours_points[0] < 0).any() and (ours_points[0] > 1).any()
    for i, (a, b) in enumerate(zip(ours_points, ref_points)):
        torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=f"attack point {i}")
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=ATOL)
    assert ours_model.training


@pytest.mark.parametrize("steps", [STEPS, 3])
@pytest.mark.parametrize("name", ["trades", "mart"])
def test_training_step_matches_official_step(batch, name, steps) -> None:
    """Loss and updated parameters of one SGD step equal the official step's (BN buffers may not: the
    official codes run extra train-mode clean forwards, see the deviation table)."""
    x, y = batch
    ours_model, ref_model = _model(), _model()
    opt = torch.optim.SGD(ours_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(SEED)
    metrics = TrainStep(ours_model, _defense(name, steps), opt)(x, y)

    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(SEED)
    x_adv = _official_attack(name, ref_model, x, y, steps)
    ref_opt.zero_grad()
    loss = _official_outer_loss(name, ref_model, x, x_adv, y)
    loss.backward()
    ref_opt.step()

    torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=0, atol=1e-10)
    for (n, pa), pb in zip(ours_model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-10, msg=n)


@pytest.mark.parametrize("name,steps", [("trades", STEPS), ("trades", 3), ("mart", 3)])
def test_official_comparison_is_sensitive_to_the_start(batch, name, steps) -> None:
    """Guards the tests above: on this batch a clipped start or a uniform start gives another x_adv."""
    x, y = batch
    torch.manual_seed(SEED)
    expected = _official_attack(name, _model(), x, y, steps)
    for kind, clip in (("normal", True), ("uniform", False)):
        defense = _defense(name, steps)
        threat = defense.attack.threat
        model = _model()
        torch.manual_seed(SEED)
        delta0 = threat.random_init(x, kind)
        if clip:
            delta0 = threat.project(delta0, x)
        objective = TrainStep(model, defense, torch.optim.SGD(model.parameters(), lr=0.1)).objective(x, y)
        delta = delta0
        model.eval()
        for _ in range(steps):
            delta.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(model, x + delta).sum(), delta)
            delta = threat.step(delta.detach(), grad, ALPHA, x)
        assert (x + delta - expected).abs().max() > 1e-6, kind


def test_steps_keep_x_adv_in_ball_and_box(batch) -> None:
    x, y = batch
    model = _model()
    defense = _defense("trades")
    x_adv = TrainStep(model, defense, torch.optim.SGD(model.parameters(), lr=0.1)).craft(x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= EPS + 1e-12
