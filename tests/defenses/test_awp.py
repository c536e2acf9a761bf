"""AWP (docs/methods/awp.md, docs/methods/awp.md#tests): which tensors, their norms, bit-exact restore, BN
buffers, gamma = 0."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from robust_train.attacks import ThreatModel
from robust_train.defenses import AWP, build_defense, perturbed_parameter_names
from robust_train.models import build_model
from robust_train.training.step import TrainStep

EPS = 8 / 255


@pytest.fixture
def prn() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("preact_resnet18", 10, (0.5,) * 3, (0.25,) * 3, width=0.0625).double()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)


def _ce(x, y):
    return lambda m: F.cross_entropy(m(x), y)


def test_perturbed_set_is_conv_and_linear_weights(prn) -> None:
    names = perturbed_parameter_names(prn)
    assert len(names) == 21  # 20 conv kernels (incl. 3 shortcut convs) + the final linear weight
    assert "fc.weight" in names and "fc.bias" not in names
    assert not any("bn" in n for n in names)


def test_perturbation_norms_are_gamma_times_weight_norms(prn, data) -> None:
    x, y = data
    gamma = 0.01
    before = {n: p.detach().clone() for n, p in prn.named_parameters()}
    awp = AWP(gamma)
    with awp.perturb(prn, _ce(x, y)):
        for name, p in prn.named_parameters():
            diff = (p - before[name]).norm()
            if name in perturbed_parameter_names(prn):
                torch.testing.assert_close(diff, gamma * before[name].norm(), rtol=1e-5, atol=0)
            else:
                assert diff == 0, name


def test_restore_is_bit_exact_and_bn_buffers_untouched(prn, data) -> None:
    x, y = data
    prn.train()
    state = copy.deepcopy(prn.state_dict())
    with awp_ctx(prn, x, y):
        pass
    for k, v in prn.state_dict().items():
        assert torch.equal(v, state[k]), k


def awp_ctx(model, x, y):
    return AWP(0.01).perturb(model, _ce(x, y))


def test_restore_happens_on_error(prn, data) -> None:
    x, y = data
    state = copy.deepcopy(prn.state_dict())
    with pytest.raises(RuntimeError, match="inside"), awp_ctx(prn, x, y):
        raise RuntimeError("inside")
    assert all(torch.equal(v, state[k]) for k, v in prn.state_dict().items())


def test_direction_equals_reference_proxy_sgd_for_any_proxy_lr(prn, data) -> None:
    """The reference's proxy SGD step on -loss, renormalized per layer, gives our direction (lr cancels)."""
    x, y = data
    ours = AWP(0.01).directions(prn, _ce(x, y))
    for lr in (0.01, 0.1):
        proxy = copy.deepcopy(prn)
        proxy.train()
        opt = torch.optim.SGD(proxy.parameters(), lr=lr)
        opt.zero_grad()
        (-F.cross_entropy(proxy(x), y)).backward()
        opt.step()
        weights, moved = dict(prn.named_parameters()), dict(proxy.named_parameters())
        for name, v in ours.items():
            d = moved[name].detach() - weights[name].detach()
            ref = d * weights[name].norm() / (d.norm() + 1e-20)
            torch.testing.assert_close(v, ref, rtol=1e-6, atol=1e-9)


def test_optimizer_step_is_taken_at_the_perturbed_point_then_perturbation_removed(prn, data) -> None:
    x, y = data
    model = copy.deepcopy(prn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    awp = AWP(0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with awp.perturb(model, _ce(x, y)) as v:
        perturbed = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    for name, p in model.named_parameters():
        expected = before[name] - 0.1 * grads[name]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)
        if name in v:
            assert not torch.equal(perturbed[name], before[name])


def _awp_defense(gamma: float, warmup: int = 0):
    cfg = {"name": "pgd_at", "attack": {"name": "pgd", "steps": 2, "step": 2 / 255, "bn_mode": "train"},
           "awp": {"enabled": True, "gamma": gamma, "warmup_epochs": warmup}}  # fmt: skip
    return build_defense(OmegaConf.create(cfg), ThreatModel("linf", EPS))


def _plain_defense():
    cfg = {"name": "pgd_at", "attack": {"name": "pgd", "steps": 2, "step": 2 / 255, "bn_mode": "train"}}
    return build_defense(OmegaConf.create(cfg), ThreatModel("linf", EPS))


def _step(model, defense, x, y, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    return TrainStep(model, defense, opt)(x, y)


@pytest.mark.parametrize("gamma,warmup", [(0.0, 0), (0.01, 5)])
def test_gamma_zero_or_warmup_is_exactly_the_plain_step(prn, data, gamma, warmup) -> None:
    x, y = data
    a, b = copy.deepcopy(prn), copy.deepcopy(prn)
    defense = _awp_defense(gamma, warmup)
    defense.on_epoch_start(0)
    ma = _step(a, defense, x, y)
    mb = _step(b, _plain_defense(), x, y)
    assert torch.equal(ma["loss"], mb["loss"])
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_awp_step_differs_from_plain_step(prn, data) -> None:
    x, y = data
    a, b = copy.deepcopy(prn), copy.deepcopy(prn)
    ma = _step(a, _awp_defense(0.01), x, y)
    mb = _step(b, _plain_defense(), x, y)
    assert not torch.equal(ma["loss"], mb["loss"])


def test_proxy_forward_leaves_model_bn_statistics_untouched(prn, data) -> None:
    x, y = data
    prn.train()
    buffers = {n: b.clone() for n, b in prn.named_buffers()}
    awp = AWP(0.01)
    awp.directions(prn, _ce(x, y))
    assert all(torch.equal(b, buffers[n]) for n, b in prn.named_buffers())
    # The proxy itself did run in train mode: its statistics moved.
    assert any(not torch.equal(b, buffers[n]) for n, b in awp.proxy_module.named_buffers() if "running" in n)
