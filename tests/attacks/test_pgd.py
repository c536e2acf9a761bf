"""PGD/FGSM properties of docs/methods/pgd.md#tests and the attack contract (robust_train/attacks/base.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks import FGSM, PGD, ThreatModel, attack_mode, build_attack

EPS = 8 / 255


def _assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, threat: ThreatModel) -> None:
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    if threat.norm == "linf":
        assert d.abs().max() <= threat.eps + 1e-7
    else:
        assert d.norm(dim=1).max() <= threat.eps + 1e-5


@pytest.mark.parametrize("norm,eps,step", [("linf", EPS, 2 / 255), ("l2", 0.5, 0.1)])
@pytest.mark.parametrize("start", ["uniform", "normal", "none"])
# 0 steps: the `normal` start is not clipped to the box, so only the final clamp keeps x_adv in [0, 1].
@pytest.mark.parametrize("steps", [0, 5])
def test_stays_in_ball_and_box(tiny_model, batch, norm, eps, step, start, steps) -> None:
    x, y = batch
    threat = ThreatModel(norm, eps)
    x_adv = PGD(threat, steps=steps, step_size=step, random_start=start)(tiny_model, x, y)
    _assert_in_ball(x_adv, x, threat)


def test_zero_steps_random_start_in_ball_and_eps_zero_is_identity(tiny_model, batch) -> None:
    x, y = batch
    threat = ThreatModel("linf", EPS)
    x0 = PGD(threat, steps=0, step_size=2 / 255)(tiny_model, x, y)
    _assert_in_ball(x0, x, threat)
    assert not torch.equal(x0, x)
    same = PGD(ThreatModel("linf", 0.0), steps=5, step_size=2 / 255)(tiny_model, x, y)
    assert torch.equal(same, x)


def test_one_step_on_linear_model_matches_hand_computation(batch) -> None:
    x, y = batch
    x, lin = x.double(), nn.Linear(3 * 32 * 32, 10).double()
    model = nn.Sequential(nn.Flatten(), lin)
    alpha = 2 / 255
    x_adv = PGD(ThreatModel("linf", EPS), steps=1, step_size=alpha, random_start="none")(model, x, y)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y).backward()
    expected = (x + (alpha * xr.grad.sign()).clamp(-EPS, EPS)).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-12)


def test_loss_increases(tiny_model, batch) -> None:
    x, y = batch
    tiny_model.eval()
    torch.manual_seed(0)
    x_adv = PGD(ThreatModel("linf", EPS), steps=10, step_size=2 / 255)(tiny_model, x, y)
    assert ((x_adv - x).flatten(1).abs().amax(1) > 0).all()
    with torch.no_grad():
        clean_loss = F.cross_entropy(tiny_model(x), y, reduction="none")
        gain = F.cross_entropy(tiny_model(x_adv), y, reduction="none") - clean_loss
    # Every example gains; 10 steps gain 0.0064 on average here, one step 0.0017 and no attack 0, so the
    # bound also fails an attack that stops after its first step.
    assert (gain > 0).all() and gain.mean() > 0.004


def test_restores_mode_and_requires_grad_even_on_error(tiny_model, batch) -> None:
    x, y = batch
    tiny_model.train()
    tiny_model.fc.weight.requires_grad_(False)  # a mixed state must come back as it was
    PGD(ThreatModel("linf", EPS), steps=2, step_size=2 / 255, bn_mode="eval")(tiny_model, x, y)
    assert tiny_model.training and tiny_model.bn.training
    assert tiny_model.conv.weight.requires_grad and not tiny_model.fc.weight.requires_grad

    def boom(model: nn.Module, xa: torch.Tensor) -> torch.Tensor:
        assert not model.training and not model.conv.weight.requires_grad
        raise RuntimeError("inside the attack")

    with pytest.raises(RuntimeError, match="inside the attack"):
        PGD(ThreatModel("linf", EPS), steps=2, step_size=2 / 255)(tiny_model, x, y, boom)
    assert tiny_model.training and tiny_model.conv.weight.requires_grad


def test_no_parameter_gradients_accumulate(tiny_model, batch) -> None:
    x, y = batch
    PGD(ThreatModel("linf", EPS), steps=3, step_size=2 / 255)(tiny_model, x, y)
    assert all(p.grad is None for p in tiny_model.parameters())


def test_bn_mode_eval_keeps_running_stats_and_train_changes_them(tiny_model, batch) -> None:
    x, y = batch
    before = tiny_model.bn.running_mean.clone()
    PGD(ThreatModel("linf", EPS), steps=2, step_size=2 / 255, bn_mode="eval")(tiny_model, x, y)
    assert torch.equal(tiny_model.bn.running_mean, before)
    tiny_model.eval()
    PGD(ThreatModel("linf", EPS), steps=2, step_size=2 / 255, bn_mode="train")(tiny_model, x, y)
    assert not torch.equal(tiny_model.bn.running_mean, before)
    assert not tiny_model.training


def test_deterministic_under_seed(tiny_model, batch) -> None:
    x, y = batch
    attack = PGD(ThreatModel("linf", EPS), steps=3, step_size=2 / 255, restarts=2)
    torch.manual_seed(5)
    a = attack(tiny_model, x, y)
    torch.manual_seed(5)
    b = attack(tiny_model, x, y)
    torch.manual_seed(6)
    c = attack(tiny_model, x, y)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_restarts_keep_the_worst_restart_per_example(tiny_model, batch) -> None:
    x, y = batch
    tiny_model.eval()
    threat = ThreatModel("linf", EPS)
    torch.manual_seed(3)
    multi = PGD(threat, steps=2, step_size=2 / 255, restarts=3)(tiny_model, x, y)
    torch.manual_seed(3)
    singles = [PGD(threat, steps=2, step_size=2 / 255, restarts=1)(tiny_model, x, y) for _ in range(3)]
    with torch.no_grad():
        losses = torch.stack([F.cross_entropy(tiny_model(s), y, reduction="none") for s in singles])
        best = losses.argmax(0)
        expected = torch.stack([singles[int(k)][i] for i, k in enumerate(best)])
        torch.testing.assert_close(multi, expected)


def test_counts_passes(tiny_model, batch) -> None:
    x, y = batch
    attack = PGD(ThreatModel("linf", EPS), steps=4, step_size=2 / 255)
    attack(tiny_model, x, y)
    assert (attack.forward_passes, attack.backward_passes) == (4, 4)


def test_fgsm_is_one_eps_step(batch) -> None:
    x, y = batch
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    x_adv = FGSM(ThreatModel("linf", EPS))(model, x, y)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y).backward()
    torch.testing.assert_close(x_adv, (x + EPS * xr.grad.sign()).clamp(0, 1))


def test_l2_step_uses_normalized_gradient(batch) -> None:
    x, y = batch
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).double()
    x = x.double()
    x_adv = PGD(ThreatModel("l2", 10.0), steps=1, step_size=0.05, random_start="none")(model, x, y)
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y, reduction="sum").backward()
    g = xr.grad
    expected = (x + 0.05 * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected)


def test_build_attack_parses_fractions_and_overrides_eps() -> None:
    threat = ThreatModel("linf", EPS)
    pgd = build_attack({"name": "pgd", "steps": 7, "step": "1/255", "eps": "4/255"}, threat)
    assert isinstance(pgd, PGD) and pgd.steps == 7
    assert pgd.step_size == pytest.approx(1 / 255) and pgd.threat.eps == pytest.approx(4 / 255)


def test_attack_mode_rejects_unknown_bn_mode(tiny_model) -> None:
    from robust_train.errors import ConfigError

    with pytest.raises(ConfigError, match="bn_mode"), attack_mode(tiny_model, "frozen"):
        pass
