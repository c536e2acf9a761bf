"""Value tests for small pieces of attack/defense math that no other fast test pins.

Each test reproduces a formula exactly (float64, fixed generators), so a change to a sign, a
clamp, a radius or a generator argument fails it:
- ThreatModel.random_init: the uniform Linf / L2 and 'normal' starts, and the generator argument;
- ssa_loss: every term of sum_i max(w+_i s+_i - w-_i s-_i, 0) on a hand-computed example;
- TRADES.outer_loss: the logged term names and their values (CE on clean, batchmean KL).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from robust_train.attacks import ThreatModel
from robust_train.attacks.ssa import ssa_loss
from robust_train.defenses import build_defense
from robust_train.step_types import LABEL, StepForwards

SHAPE = (4, 3, 2, 2)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _interior() -> torch.Tensor:
    # Every pixel at 0.5: a start of size <= eps < 0.5 is never clipped by the [0, 1] box.
    return torch.full(SHAPE, 0.5, dtype=torch.float64)


# --- ThreatModel.random_init -------------------------------------------------------------------


def test_uniform_linf_start_is_2u_minus_1_times_eps():
    eps = 0.1
    torch.manual_seed(999)  # the global RNG differs from the generator's stream
    delta = ThreatModel("linf", eps).random_init(_interior(), "uniform", generator=_gen(7))
    u = torch.rand(SHAPE, generator=_gen(7), dtype=torch.float64)
    expected = (2 * u - 1) * eps
    assert delta.dtype == torch.float64
    torch.testing.assert_close(delta, expected, rtol=0, atol=1e-15)
    assert delta.abs().max() <= eps


def test_uniform_l2_start_has_radius_r_eps_and_direction_g_over_norm():
    eps = 0.3
    torch.manual_seed(999)  # the global RNG differs from the generator's stream
    delta = ThreatModel("l2", eps).random_init(_interior(), "uniform", generator=_gen(11))
    # Reproduce the draws in order: the direction g first, then one radius fraction r per example.
    g_ref = _gen(11)
    g = torch.randn(SHAPE, generator=g_ref, dtype=torch.float64)
    r = torch.rand((SHAPE[0], 1, 1, 1), generator=g_ref).to(torch.float64)
    g_norm = g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = g / (g_norm + 1e-10) * r * eps  # 1e-10: threat._TINY, keeps a zero draw finite
    torch.testing.assert_close(delta, expected, rtol=1e-14, atol=1e-16)
    # Per-example norm is r * eps (strictly inside the ball), direction g / ||g||.
    norms = delta.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, r.flatten() * eps, rtol=1e-9, atol=0)
    assert (norms < eps).all()
    torch.testing.assert_close(delta / norms.view(-1, 1, 1, 1), g / g_norm, rtol=1e-12, atol=1e-15)


def test_normal_start_is_exactly_0001_randn_and_not_clipped():
    torch.manual_seed(999)
    x = torch.zeros(SHAPE, dtype=torch.float64)  # pixels at 0: negative starts leave the box, as drawn
    for norm in ("linf", "l2"):
        delta = ThreatModel(norm, 8 / 255).random_init(x, "normal", generator=_gen(3))
        expected = 0.001 * torch.randn(SHAPE, generator=_gen(3), dtype=torch.float64)
        torch.testing.assert_close(delta, expected, rtol=0, atol=0)
        assert (delta < 0).any()


@pytest.mark.parametrize(("norm", "kind"), [("linf", "uniform"), ("l2", "uniform"), ("linf", "normal")])
def test_generator_is_honoured(norm, kind):
    tm = ThreatModel(norm, 0.2)
    x = _interior()
    torch.manual_seed(1)
    a = tm.random_init(x, kind, generator=_gen(5))
    torch.manual_seed(2)  # a different global stream must not matter
    b = tm.random_init(x, kind, generator=_gen(5))
    c = tm.random_init(x, kind, generator=_gen(6))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_l2_start_direction_and_radius_both_come_from_the_generator():
    # Same generator seed, different global seeds: identical starts, including per-example norms.
    tm = ThreatModel("l2", 0.3)
    x = _interior()
    torch.manual_seed(100)
    a = tm.random_init(x, "uniform", generator=_gen(21))
    torch.manual_seed(200)
    b = tm.random_init(x, "uniform", generator=_gen(21))
    assert torch.equal(a.flatten(1).norm(dim=1), b.flatten(1).norm(dim=1))
    assert torch.equal(a, b)


# --- ssa_loss ----------------------------------------------------------------------------------


def _ssa_example():
    """clean = scaled basis vectors e0, e1, e2; feats = scaled unit vectors with chosen cosines."""
    clean = torch.diag(torch.tensor([1.5, 4.0, 0.25], dtype=torch.float64))
    f = torch.tensor(
        [
            [0.8, 0.6, 0.0],  # s+ = 0.8, negative 1: s- = 0.6 (> margin)
            [0.5, 0.3, math.sqrt(1 - 0.34)],  # s+ = 0.3, negative 0: s- = 0.5 -> term < 0, clamped
            [-0.6, 0.0, 0.8],  # s+ = 0.8, negative 0: s- = -0.6
        ],
        dtype=torch.float64,
    )
    feats = f * torch.tensor([[2.0], [0.5], [3.0]], dtype=torch.float64)  # cosine ignores the scale
    negatives = torch.tensor([1, 0, 0])
    return feats, clean, negatives


def test_ssa_loss_hand_computed_value():
    margin = 0.2
    feats, clean, negatives = _ssa_example()
    # Row 0: w+ = 0.8-0.2 = 0.6, w- = 1+0.2-0.6 = 0.6:  0.6*0.8 - 0.6*0.6 = 0.12
    # Row 1: w+ = 0.1, w- = 0.7:                        0.1*0.3 - 0.7*0.5 = -0.32 -> 0
    # Row 2: w+ = 0.6, w- = 1.8:                        0.6*0.8 + 1.8*0.6 = 1.56
    loss = ssa_loss(feats, clean, negatives, margin)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(0.12 + 0.0 + 1.56, abs=1e-12)


def test_ssa_loss_per_row_terms():
    margin = 0.2
    feats, clean, negatives = _ssa_example()
    per_row = [
        ssa_loss(
            feats[i : i + 1], clean[torch.tensor([i, int(negatives[i])])], torch.tensor([1]), margin
        ).item()
        for i in range(3)
    ]
    # Each row alone (its clean image at index 0, its negative at index 1): same terms.
    assert per_row == pytest.approx([0.12, 0.0, 1.56], abs=1e-12)


def test_ssa_loss_positive_weight_clamps_at_zero_below_margin():
    # s+ = 0.1 < margin: w+ = 0 (not -0.1); s- = -0.5: w- = 1.7 -> loss = 0*0.1 + 1.7*0.5 = 0.85
    v = torch.tensor([0.1, math.sqrt(0.99)], dtype=torch.float64)  # unit, cos with e0 = 0.1
    perp = torch.tensor([-math.sqrt(0.99), 0.1], dtype=torch.float64)
    u = -0.5 * v + math.sqrt(0.75) * perp  # unit, cos with v = -0.5
    clean = torch.stack([torch.tensor([1.0, 0.0], dtype=torch.float64), u])
    loss = ssa_loss(v.unsqueeze(0), clean, torch.tensor([1]), 0.2)
    assert loss.item() == pytest.approx(1.7 * 0.5, abs=1e-12)


def test_ssa_loss_weights_are_detached():
    margin = 0.2
    feats, clean, negatives = _ssa_example()
    feats = feats.clone().requires_grad_(True)
    ssa_loss(feats, clean, negatives, margin).backward()
    # With w+, w- constant: d/df [w+ s+ - w- s-] for the active rows 0 and 2; row 1 is clamped.
    fn = F.normalize(feats.detach(), dim=1)
    cn = F.normalize(clean, dim=1)
    norms = feats.detach().norm(dim=1, keepdim=True)

    def dcos(i, j):  # gradient of cos(f_i, c_j) with respect to f_i
        c = cn[j]
        return (c - (fn[i] @ c) * fn[i]) / norms[i, 0]

    expected = torch.zeros_like(feats)
    expected[0] = 0.6 * dcos(0, 0) - 0.6 * dcos(0, 1)
    expected[2] = 0.6 * dcos(2, 2) - 1.8 * dcos(2, 0)
    torch.testing.assert_close(feats.grad, expected, rtol=1e-10, atol=1e-12)


# --- TRADES outer loss -------------------------------------------------------------------------


class _FixedLogits(torch.nn.Module):
    def __init__(self, clean, adv, x):
        super().__init__()
        self.clean, self.adv, self.x = clean, adv, x

    def forward(self, inp):
        return self.clean if inp is self.x else self.adv


def test_trades_outer_loss_terms_and_values():
    g = _gen(0)
    clean = torch.randn(5, 4, generator=g, dtype=torch.float64)
    adv = clean + 0.8 * torch.randn(5, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 2, 3])
    x, x_adv = torch.zeros(5, 3, 2, 2), torch.ones(5, 3, 2, 2)
    defense = build_defense(
        OmegaConf.create(
            {
                "name": "trades",
                "beta": 6.0,
                "attack": {
                    "name": "pgd",
                    "steps": 1,
                    "step": 2 / 255,
                    "random_start": "normal",
                    "bn_mode": "eval",
                },
            }
        ),
        ThreatModel("linf", 8 / 255),
    )
    loss = defense.outer_loss(StepForwards(_FixedLogits(clean, adv, x), x, y, x_adv))
    assert list(loss.terms) == ["ce_clean", "kl"]

    logp_c, logp_a = F.log_softmax(clean, dim=1), F.log_softmax(adv, dim=1)
    ce_hand = -logp_c[torch.arange(5), y].mean()
    kl_hand = (logp_c.exp() * (logp_c - logp_a)).sum() / 5  # batchmean KL(p_clean || p_adv)
    ce, kl = loss.terms["ce_clean"], loss.terms["kl"]
    torch.testing.assert_close(ce.value, ce_hand, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kl.value, kl_hand, rtol=1e-12, atol=1e-14)
    assert ce.weight == 1.0 and ce.role == LABEL and ce.branch == "clean"
    assert kl.weight == 6.0 and kl.role is None
    assert loss.logits is adv
