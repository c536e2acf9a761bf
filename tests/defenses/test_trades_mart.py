"""TRADES and MART (docs/methods/trades.md#tests, docs/methods/mart.md#tests): losses against direct
computations and their properties."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from robust_train.attacks import ThreatModel
from robust_train.defenses import build_defense
from robust_train.defenses.losses import kl_clean_adv, mart_loss, trades_loss
from robust_train.training.step import TrainStep

EPS = 8 / 255


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(6, 10, generator=g, dtype=torch.float64)
    adv = clean + 0.7 * torch.randn(6, 10, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 9, 5, 1])
    return clean, adv, y


def test_trades_beta_zero_is_clean_ce(logits) -> None:
    clean, adv, y = logits
    loss, ce, _ = trades_loss(clean, adv, y, beta=0.0)
    assert torch.equal(loss, F.cross_entropy(clean, y)) and torch.equal(loss, ce)


@pytest.mark.filterwarnings("ignore:reduction")
def test_trades_matches_formula_and_batchmean_not_mean(logits) -> None:
    clean, adv, y = logits
    beta = 6.0
    loss, _, kl = trades_loss(clean, adv, y, beta)
    p, logp_adv = F.softmax(clean, 1), F.log_softmax(adv, 1)
    direct_kl = (p * (p.log() - logp_adv)).sum() / clean.shape[0]
    torch.testing.assert_close(kl, direct_kl)
    torch.testing.assert_close(loss, F.cross_entropy(clean, y) + beta * direct_kl)
    torch.testing.assert_close(F.kl_div(logp_adv, p, reduction="sum") / clean.shape[0], kl)
    torch.testing.assert_close(F.kl_div(logp_adv, p, reduction="mean") * clean.shape[1], kl)


def test_trades_kl_zero_at_identity_and_nonnegative(logits) -> None:
    clean, adv, _ = logits
    assert torch.allclose(kl_clean_adv(clean, clean), torch.zeros(6, dtype=torch.float64), atol=1e-12)
    assert (kl_clean_adv(adv, clean) >= 0).all()


def test_trades_kl_gradient_flows_through_clean_branch(logits) -> None:
    clean, adv, y = (t.clone() for t in logits)
    clean.requires_grad_(True)
    _, _, kl = trades_loss(clean, adv, y, 1.0)
    (g,) = torch.autograd.grad(kl, clean)
    assert g.abs().sum() > 0


def test_mart_matches_closed_form(logits) -> None:
    clean, adv, y = logits
    beta = 5.0
    loss, bce, kl = mart_loss(clean, adv, y, beta)
    q, p = F.softmax(adv, 1), F.softmax(clean, 1)
    rows = []
    for i in range(clean.shape[0]):
        order = torch.argsort(q[i], descending=True)
        wrong = order[1] if order[0] == y[i] else order[0]
        assert wrong != y[i]
        bce_i = -torch.log(q[i, y[i]]) - torch.log(1.0001 - q[i, wrong] + 1e-12)
        kl_i = sum(p[i, k] * (torch.log(p[i, k]) - torch.log(q[i, k] + 1e-12)) for k in range(10))
        rows.append((bce_i, kl_i * (1.0000001 - p[i, y[i]])))
    direct_bce = torch.stack([r[0] for r in rows]).mean()
    direct_kl = torch.stack([r[1] for r in rows]).mean()
    torch.testing.assert_close(bce, direct_bce)
    torch.testing.assert_close(kl, direct_kl)
    torch.testing.assert_close(loss, direct_bce + beta * direct_kl)


def test_mart_beta_zero_and_bce_bounds_ce(logits) -> None:
    clean, adv, y = logits
    loss, bce, _ = mart_loss(clean, adv, y, 0.0)
    assert torch.equal(loss, bce) and bce >= F.cross_entropy(adv, y)


def test_mart_kl_weight_vanishes_when_clean_is_certain() -> None:
    y = torch.tensor([2])
    clean = torch.full((1, 10), -50.0, dtype=torch.float64)
    clean[0, 2] = 50.0
    adv = torch.randn(1, 10, dtype=torch.float64)
    _, _, kl = mart_loss(clean, adv, y, 1.0)
    assert kl.abs() < 1e-5


def _defense(name: str, **extra):
    cfg = {"name": name, "beta": 6.0, "attack": {"name": "pgd", "steps": 3, "step": 2 / 255,
           "random_start": "normal", "bn_mode": "eval"}, **extra}  # fmt: skip
    return build_defense(OmegaConf.create(cfg), ThreatModel("linf", EPS))


@pytest.mark.parametrize("name", ["trades", "mart"])
def test_training_attack_in_ball_runs_in_eval_mode_and_restores_train(tiny_model, batch, name) -> None:
    x, y = batch
    defense = _defense(name)
    seen = []
    base = defense.inner_objective(x, y)

    def spy(model, xa):
        seen.append(model.training)
        return base(model, xa)

    tiny_model.train()
    x_adv = defense.craft(tiny_model, x, y, spy)
    assert (x_adv - x).abs().max() <= EPS + 1e-7 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert seen and not any(seen) and tiny_model.training


def test_trades_attack_ascends_kl_from_the_clean_eval_target(tiny_model, batch) -> None:
    x, y = batch
    defense = _defense("trades")
    tiny_model.eval()
    objective = defense.inner_objective(x, y)
    at_clean = objective(tiny_model, x)
    assert torch.allclose(at_clean, torch.zeros_like(at_clean), atol=1e-6)
    x_adv = defense.craft(tiny_model, x, y, defense.inner_objective(x, y))
    with torch.no_grad():
        assert kl_clean_adv(tiny_model(x_adv), tiny_model(x)).mean() > 0


def test_trades_step_with_beta_zero_is_clean_ce_step(tiny_model, batch) -> None:
    x, y = batch
    ref = copy.deepcopy(tiny_model)
    defense = _defense("trades")
    defense.beta = 0.0
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    metrics = TrainStep(tiny_model, defense, opt)(x, y)
    ref.train()
    torch.testing.assert_close(metrics["loss"], F.cross_entropy(ref(x), y).detach())
