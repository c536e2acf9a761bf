"""ISEAT add-on (docs/methods/iseat.md#tests): rank weights, the LSIW term, nu, the step against a replica of
the
released code, schedules, pass counts, analysis helpers, zero strength == base step, config, end to end."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from robust_train.addons import AddonContext
from robust_train.addons.iseat import (
    ISEAT,
    ISEATConfig,
    instance_weights,
    logit_distance,
    rank_weights,
    smoothing_term,
    stage_value,
)
from robust_train.addons.iseat_analysis import av_statistics, margin_along_direction
from robust_train.attacks import ThreatModel
from robust_train.builders import model_from_config, threat_from_config
from robust_train.commands.train import train_run
from robust_train.config import validate_train_config
from robust_train.defenses import build_defense, perturbed_parameter_names
from robust_train.errors import ConfigError
from robust_train.schema import plain
from robust_train.step_types import StepForwards
from robust_train.training.schedule import lr_at
from robust_train.training.step import TrainStep

CONF = Path(__file__).resolve().parents[2] / "robust_train" / "conf"
EPS, ALPHA, K = 8 / 255, 2 / 255, 3


# ----------------------------------------------------------------------------- helpers


def _defense(
    name: str = "pgd_at", start: str = "none", bn_mode: str = "train", awp_gamma: float | None = None
):
    node = {"name": name, **({"beta": 6.0} if name in ("trades", "mart") else {}),
            "attack": {"name": "pgd", "steps": K, "step": ALPHA, "restarts": 1, "random_start": start,
                       "bn_mode": bn_mode}}  # fmt: skip
    if awp_gamma is not None:
        node["awp"] = {"enabled": True, "gamma": awp_gamma, "warmup_epochs": 0}
    return build_defense(OmegaConf.create(node), ThreatModel("linf", EPS))


def _iseat(model: nn.Module, defense, milestones=(), **overrides) -> ISEAT:
    cfg = OmegaConf.merge(OmegaConf.create(plain(ISEATConfig())), OmegaConf.create(overrides))
    run = OmegaConf.create({"trainer": {"schedule": {"name": "piecewise", "milestones": list(milestones)}}})
    ctx = AddonContext(cfg=run, model=model, defense=defense, threat=defense.threat, num_classes=10, seed=0)
    return ISEAT(cfg, ctx)


def _sgd(model: nn.Module, lr: float = 0.1, momentum: float = 0.9, wd: float = 5e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _batches(n: int, size: int = 16, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.rand(8, 3, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, 10, (8,), generator=g),
        )
        for _ in range(n)
    ]


def _manual_weights(av: torch.Tensor) -> torch.Tensor:
    """Eq. 14 the way the released code does it: the j-th smallest AV (0-based) gets (j + 1) / m."""
    m = av.shape[0]
    w = torch.empty(m, dtype=av.dtype)
    w[torch.argsort(av)] = torch.arange(1, m + 1, dtype=av.dtype) / m
    return w


def _released_pgd(model: nn.Module, x, y, g0) -> torch.Tensor:
    """The code's training PGD: zero start, step 1 from the clean gradient g0, train-mode BN."""
    d, g = torch.zeros_like(x), g0
    for _ in range(K):
        if g is None:
            xa = (x + d).clamp(0, 1).requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
        d = (d + ALPHA * g.sign()).clamp(-EPS, EPS)
        xa = (x + d).clamp(0, 1)
        d = xa - x
        g = None
    return xa.detach()


def _released_step(model, clean_copy, proxy, opt, x, y, gamma: float, lam: float) -> torch.Tensor:
    """A replica of the released training step (docs/methods/iseat.md#update): nu added in place after a proxy
    SGD step,
    the clean forward re-run on a copy holding theta, one backward, the copy's gradients merged."""
    model.train()
    x0 = x.clone().requires_grad_(True)
    z_cln = model(x0)
    ce_cln = F.cross_entropy(z_cln, y, reduction="none")
    (g0,) = torch.autograd.grad(ce_cln.mean(), x0, retain_graph=lam > 0 and gamma == 0)
    x_adv = _released_pgd(model, x, y, g0)
    nu: dict[str, torch.Tensor] = {}
    mstate = model.state_dict()
    if gamma > 0:
        clean_copy.load_state_dict(mstate)
        proxy.load_state_dict(mstate)
        proxy.train()
        popt = torch.optim.SGD(proxy.parameters(), lr=0.01)
        popt.zero_grad()
        (-F.cross_entropy(proxy(x_adv), y)).backward()
        popt.step()
        pstate = proxy.state_dict()
        for name, w in mstate.items():
            if w.dim() > 1 and "weight" in name:
                diff = pstate[name] - w
                nu[name] = gamma * w.norm() * diff / (diff.norm() + 1e-20)
        with torch.no_grad():
            for name, v in nu.items():
                mstate[name].add_(v)
    z_adv = model(x_adv)
    ce_adv = F.cross_entropy(z_adv, y, reduction="none")
    loss = ce_adv.mean()
    use_copy = gamma > 0 and lam > 0
    if lam > 0:
        if use_copy:
            clean_copy.train()
            z_cln = clean_copy(x)
            ce_cln = F.cross_entropy(z_cln, y, reduction="none")
        w = _manual_weights((ce_adv - ce_cln).detach())
        loss = loss + lam * (w * (z_adv - z_cln).pow(2).sum(1)).sum() / x.shape[0]
    opt.zero_grad(set_to_none=True)
    clean_copy.zero_grad(set_to_none=True)
    loss.backward()
    if use_copy:
        for p, q in zip(model.parameters(), clean_copy.parameters()):
            p.grad += q.grad
    opt.step()
    with torch.no_grad():
        for name, v in nu.items():
            mstate[name].sub_(v)
    return loss.detach()


def _hand_x_adv(model: nn.Module, x, y) -> torch.Tensor:
    """x' of the code's PGD, computed on a copy so the model's BN statistics stay as they are."""
    m = copy.deepcopy(model).train()
    x0 = x.clone().requires_grad_(True)
    (g0,) = torch.autograd.grad(F.cross_entropy(m(x0), y), x0)
    return _released_pgd(m, x, y, g0)


def _hand_nu(model: nn.Module, x_adv, y, gamma: float) -> dict[str, torch.Tensor]:
    """nu_l = gamma * ||theta_l|| * g_l / ||g_l|| with g = grad of the batch CE on x' (train mode)."""
    m = copy.deepcopy(model).train()
    names = perturbed_parameter_names(m)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(F.cross_entropy(m(x_adv), y), [params[n] for n in names])
    return {n: gamma * params[n].detach().norm() * g / g.norm() for n, g in zip(names, grads)}


@pytest.fixture
def model(tiny_model) -> nn.Module:
    return tiny_model.double()


@pytest.fixture
def data(batch):
    x, y = batch
    return x.double(), y


# ----------------------------------------------------------------------------- docs/methods/iseat.md#tests


def test_rank_weights_example_and_properties() -> None:
    assert torch.equal(
        rank_weights(torch.tensor([0.3, 2.0, -0.1, 1.0])), torch.tensor([0.5, 1.0, 0.25, 0.75])
    )
    g = torch.Generator().manual_seed(0)
    m = 37
    av = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)
    w = rank_weights(av)
    assert not w.requires_grad
    assert w.max() == 1.0 and math.isclose(float(w.min()), 1 / m, rel_tol=1e-12)
    assert math.isclose(float(w.sum()), (m + 1) / 2, rel_tol=1e-12)
    assert torch.equal(torch.argsort(w), torch.argsort(av.detach()))
    torch.testing.assert_close(
        w, _manual_weights(av.detach()), rtol=0, atol=1e-15
    )  # same weights as the code
    perm = torch.randperm(m, generator=g)
    assert torch.equal(rank_weights(av[perm]), w[perm])


def test_weighting_variants() -> None:
    av = torch.tensor([0.5, 3.0, -1.0, 2.0, 0.0, 1.0, 4.0, 0.2, 0.1, 0.3, -0.5, 0.9])  # m = 12
    top = instance_weights(av, "top10", 0.1)  # ceil(1.2) = 2 most vulnerable
    assert torch.equal(top.nonzero().flatten(), torch.tensor([1, 6]))
    assert torch.equal(instance_weights(av, "uniform"), torch.ones(12))
    with pytest.raises(ConfigError, match="addons.iseat.weighting"):
        instance_weights(av, "cubic")


def test_regulariser_value_and_loss_match_a_manual_computation() -> None:
    z_adv = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    z_cln = torch.tensor([[0.0, 2.0, 5.0]], dtype=torch.float64)
    assert logit_distance(z_adv, z_cln).item() == 5.0  # 1 + 0 + 4: a sum over classes, not a mean

    g = torch.Generator().manual_seed(1)
    z_adv = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z_cln = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 1])
    lam = 0.3
    ce_adv = F.cross_entropy(z_adv, y, reduction="none")
    av = ce_adv.detach() - F.cross_entropy(z_cln, y, reduction="none").detach()
    loss = ce_adv.mean() + smoothing_term(z_adv, z_cln, av, lam)
    manual = 0.0
    for i in range(5):
        rank = sum(1 for j in range(5) if av[j] > av[i])
        o = sum((z_adv[i, c] - z_cln[i, c]) ** 2 for c in range(4))
        manual = manual + ce_adv[i] + lam * (1 - rank / 5) * o
    torch.testing.assert_close(loss, manual / 5, rtol=1e-12, atol=0)
    # KL variant: KL(p(x; theta) || p(x'; theta')) per example.
    kl = logit_distance(z_adv, z_cln, "kl")
    p, q = F.softmax(z_cln, 1), F.softmax(z_adv, 1)
    torch.testing.assert_close(kl, (p * (p.log() - q.log())).sum(1))


# ----------------------------------------------------------------------------- docs/methods/iseat.md#tests


def test_nu_geometry_and_bn_buffers(model, data) -> None:
    x, y = data
    model.train()
    gamma = 0.01
    x_adv = _hand_x_adv(model, x, y)
    before = _state(model)
    names = perturbed_parameter_names(model)
    grads = _hand_nu(model, x_adv, y, 1.0)  # the unit-radius direction ||theta_l|| g_l / ||g_l||
    probe = copy.deepcopy(model)
    ce_theta = F.cross_entropy(probe(x_adv), y)
    for lam in (0.0, 0.1):  # with lam > 0 the clean forward at theta runs too
        addon = _iseat(model, _defense(), lam=[lam], gamma=[gamma])
        with addon.weight_perturbation(model, x, y, x_adv, lambda m: F.cross_entropy(m(x_adv), y)):
            for name, p in model.named_parameters():
                nu = p.detach() - before[name]
                if name in names:
                    torch.testing.assert_close(nu.norm(), gamma * before[name].norm(), rtol=1e-5, atol=0)
                    cos = F.cosine_similarity(nu.flatten(), grads[name].flatten(), dim=0)
                    torch.testing.assert_close(cos, torch.ones((), dtype=cos.dtype), rtol=0, atol=1e-10)
                else:
                    assert torch.equal(nu, torch.zeros_like(nu)), name
            for name, b in model.named_buffers():
                assert torch.equal(b, before[name]), name  # the nu step leaves BN statistics alone
            probe.load_state_dict(model.state_dict())
            assert F.cross_entropy(probe(x_adv), y) > ce_theta
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k  # no optimizer step: bit-exact restore


def test_no_accumulation_with_zero_learning_rate(model) -> None:
    defense = _defense()
    step = TrainStep(
        model, defense, _sgd(model, lr=0.0, wd=0.0), [_iseat(model, defense, lam=[0.5], gamma=[0.05])]
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for x, y in _batches(3):
        step(x, y)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-6)
        assert (p.detach() - before[n]).abs().max() < 1e-14


def test_plain_sgd_update_is_adv_branch_plus_clean_branch_gradient(model) -> None:
    (x, y), lr, gamma, lam = _batches(1)[0], 0.05, 0.05, 0.5
    theta = copy.deepcopy(model)
    defense = _defense()
    step = TrainStep(
        model, defense, _sgd(model, lr, 0.0, 0.0), [_iseat(model, defense, lam=[lam], gamma=[gamma])]
    )
    loss = step(x, y)["loss"]

    x_adv = _hand_x_adv(theta, x, y)
    nu = _hand_nu(theta, x_adv, y, gamma)
    pert, clean = copy.deepcopy(theta).train(), copy.deepcopy(theta).train()
    with torch.no_grad():
        for n, p in pert.named_parameters():
            if n in nu:
                p.add_(nu[n])
    z_adv, z_cln = pert(x_adv), clean(x)
    ce_adv = F.cross_entropy(z_adv, y, reduction="none")
    w = _manual_weights((ce_adv - F.cross_entropy(z_cln, y, reduction="none")).detach())
    expected_loss = ce_adv.mean() + lam * (w * (z_adv - z_cln).pow(2).sum(1)).sum() / 8
    expected_loss.backward()  # gradients of the adversarial branch at theta+nu and the clean branch at theta
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=0, atol=1e-12)
    for p, pp, pc, p0 in zip(model.parameters(), pert.parameters(), clean.parameters(), theta.parameters()):
        torch.testing.assert_close(p.detach(), p0.detach() - lr * (pp.grad + pc.grad), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- docs/methods/iseat.md#tests


@pytest.mark.parametrize("gamma,lam", [(0.007, 0.1), (0.0, 0.1), (0.007, 0.0), (0.0, 0.0), (0.05, 1.0)])
def test_step_matches_a_replica_of_the_released_code(model, gamma: float, lam: float) -> None:
    ref = copy.deepcopy(model)
    clean_copy, proxy, opt_ref = copy.deepcopy(ref), copy.deepcopy(ref), _sgd(ref)
    defense = _defense()
    step = TrainStep(model, defense, _sgd(model), [_iseat(model, defense, lam=[lam], gamma=[gamma])])
    for x, y in _batches(3):
        loss = step(x, y)["loss"]
        loss_ref = _released_step(ref, clean_copy, proxy, opt_ref, x, y, gamma, lam)
        torch.testing.assert_close(loss, loss_ref, rtol=0, atol=1e-10)
    ref_state = ref.state_dict()
    for k, v in model.state_dict().items():  # parameters and BN buffers
        torch.testing.assert_close(v, ref_state[k], rtol=0, atol=1e-10)


def test_clean_branch_receives_gradient_only_when_lambda_is_on(model, monkeypatch) -> None:
    (x, y), defense = _batches(1)[0], _defense()
    twin = copy.deepcopy(model)
    normal = _iseat(model, defense, lam=[0.5], gamma=[0.05])
    stopped = _iseat(twin, defense, lam=[0.5], gamma=[0.05])
    original = stopped._references

    def detached(*args):
        refs = original(*args)
        refs.clean = refs.clean.detach()
        return refs

    monkeypatch.setattr(stopped, "_references", detached)
    TrainStep(model, defense, _sgd(model, 0.1, 0.0, 0.0), [normal])(x, y)
    TrainStep(twin, defense, _sgd(twin, 0.1, 0.0, 0.0), [stopped])(x, y)
    assert not all(
        torch.allclose(p, q, rtol=0, atol=1e-8) for p, q in zip(model.parameters(), twin.parameters())
    )

    # lambda = 0: no clean forward at theta is taken at all, so no clean-branch gradient can reach theta.
    off = _iseat(twin, defense, lam=[0.0], gamma=[0.05])
    monkeypatch.setattr(off, "_references", lambda *a: pytest.fail("clean forward taken with lambda = 0"))
    TrainStep(twin, defense, _sgd(twin), [off])(x, y)


def test_gamma_positive_lambda_zero_equals_at_awp_exactly(model) -> None:
    twin = copy.deepcopy(model)
    d1, d2 = _defense(), _defense(awp_gamma=0.01)
    s1 = TrainStep(model, d1, _sgd(model), [_iseat(model, d1, lam=[0.0], gamma=[0.01])])
    s2 = TrainStep(twin, d2, _sgd(twin))
    for x, y in _batches(2):
        assert torch.equal(s1(x, y)["loss"], s2(x, y)["loss"])
    for (k, v), w in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(v, w), k


def test_gamma_zero_is_weighted_input_smoothing(model) -> None:
    (x, y), lr, lam = _batches(1)[0], 0.05, 0.3
    theta = copy.deepcopy(model).train()
    defense = _defense()
    step = TrainStep(
        model, defense, _sgd(model, lr, 0.0, 0.0), [_iseat(model, defense, lam=[lam], gamma=[0.0])]
    )
    metrics = step(x, y)
    x_adv = _hand_x_adv(theta, x, y)
    z_adv, z_cln = theta(x_adv), theta(x)  # both at theta: Table 7's "+ input loss smoothing"
    ce_adv = F.cross_entropy(z_adv, y, reduction="none")
    w = _manual_weights((ce_adv - F.cross_entropy(z_cln, y, reduction="none")).detach())
    term = lam * (w * (z_adv - z_cln).pow(2).sum(1)).sum() / 8
    (ce_adv.mean() + term).backward()
    torch.testing.assert_close(metrics["iseat/lsiw"], term.detach(), rtol=0, atol=1e-12)
    for p, p0 in zip(model.parameters(), theta.parameters()):
        torch.testing.assert_close(p.detach(), p0.detach() - lr * p0.grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "pairing,distance,weighting",
    [("lsiw", "sql2", "linear"), ("lsi", "sql2", "linear"), ("trades_awp", "sql2", "linear"),
     ("lsiw", "kl", "top10"), ("lsiw", "sql2", "uniform")],
)  # fmt: skip
def test_term_matches_hand_computation_for_each_variant(model, data, pairing, distance, weighting) -> None:
    x, y = data
    model.train()
    x_adv = _hand_x_adv(model, x, y)
    theta = copy.deepcopy(model)
    defense = _defense()
    addon = _iseat(model, defense, lam=[0.5], gamma=[0.02], pairing=pairing, distance=distance,
                   weighting=weighting, top_fraction=0.25)  # fmt: skip
    with addon.weight_perturbation(model, x, y, x_adv, lambda m: F.cross_entropy(m(x_adv), y)):
        out = StepForwards(model, x, y, x_adv)
        term = addon.outer_loss(out, defense.outer_loss(out))["lsiw"]
        pert = copy.deepcopy(model)
    z_adv = pert(x_adv)
    target = pert(x) if pairing == "trades_awp" else theta(x)
    z = theta(x_adv) if pairing == "lsi" else z_adv
    av = (F.cross_entropy(z_adv, y, reduction="none") - F.cross_entropy(target, y, reduction="none")).detach()
    if weighting == "linear":
        w = _manual_weights(av)
    elif weighting == "top10":
        w = torch.zeros(8, dtype=av.dtype)
        w[torch.argsort(av, descending=True)[:2]] = 1.0
    else:
        w = torch.ones(8, dtype=av.dtype)
    if distance == "sql2":
        d = (z - target).pow(2).sum(1)
    else:
        p = F.softmax(target, 1)
        d = (p * (F.log_softmax(target, 1) - F.log_softmax(z, 1))).sum(1)
    torch.testing.assert_close(term, 0.5 * (w * d).sum() / 8, rtol=1e-10, atol=1e-12)


def test_clean_point_attack_start_takes_the_target_at_the_attacks_first_point(model, data) -> None:
    x, y = data
    model.train()
    defense = _defense(start="uniform")
    addon = _iseat(model, defense, lam=[0.5], gamma=[0.0], clean_point="attack_start")
    x0 = (x + 0.01).clamp(0, 1)
    with addon.attack_context(model, x, y):
        for point in (x0, x):  # only the first objective call of the attack is the start point
            addon.inner_objective(point, y, model(point), {}, None, model, torch.zeros(8))
    with addon.weight_perturbation(model, x, y, x, lambda m: F.cross_entropy(m(x), y)):
        torch.testing.assert_close(addon._ref.clean, copy.deepcopy(model)(x0))


# ----------------------------------------------------------------------------- docs/methods/iseat.md#tests


def test_lambda_switches_on_at_the_first_lr_milestone_and_lists_repeat(model) -> None:
    addon = _iseat(model, _defense(), milestones=[100, 150], lam=[0, 0.1], gamma=[0.007])
    sched = OmegaConf.create({"name": "piecewise", "milestones": [100, 150], "gamma": 0.1})
    for epoch, lam in [(0, 0.0), (99, 0.0), (100, 0.1), (149, 0.1), (150, 0.1), (199, 0.1)]:
        addon.on_epoch_start(epoch)
        assert (addon.lam_t, addon.gamma_t, addon.awp.active) == (lam, 0.007, True)
        # The regularizer starts in the epoch whose learning rate first drops.
        assert (lam > 0) == (lr_at(sched, 0.1, 200, epoch, 0, 10) < 0.1)
    three = _iseat(model, _defense(), milestones=[100, 150], lam=[0, 0.1, 0.2], gamma=[0.007, 0.0])
    three.on_epoch_start(160)
    assert (three.lam_t, three.gamma_t, three.awp.active) == (0.2, 0.0, False)
    assert stage_value([0.0, 0.1], 5) == 0.1


def test_svhn_preset_ramps_eps_and_keeps_lambda_and_nu_off(compose, model, data) -> None:
    x, y = data
    cfg = compose(["experiment=iseat/svhn_prn18", "logger=none"])
    validate_train_config(cfg)
    defense = build_defense(cfg.defense, threat_from_config(cfg.threat))
    ctx = AddonContext(cfg=cfg, model=model, defense=defense, threat=defense.threat, num_classes=10, seed=0)
    addon = ISEAT(cfg.addons.iseat, ctx)
    for epoch in range(7):
        addon.on_epoch_start(epoch)
        with addon.attack_context(model, x, y):
            eps, step = defense.attack.threat.eps, defense.attack.step_size
        frac = min(epoch / 5, 1.0)
        assert math.isclose(eps, 8 / 255 * frac) and math.isclose(step, 1 / 255 * frac)
        assert (addon.lam_t, addon.gamma_t, addon.awp.active) == (
            (0.0, 0.0, False) if epoch < 5 else (0.1, 0.009, True)
        )
        assert (defense.attack.threat.eps, defense.attack.step_size) == (8 / 255, 1 / 255)  # restored
    addon.on_epoch_start(0)
    assert torch.equal(TrainStep(model, defense, _sgd(model), [addon]).craft(x, y), x)  # eps = 0 in epoch 0


PRN18_PRESETS = sorted(p.stem for p in (CONF / "experiment" / "iseat").glob("*prn18.yaml"))


def test_prn18_presets_use_the_released_codes_raw_input_shortcut(compose) -> None:
    # The released PreActResNet-18 feeds the block input itself to the 1x1 projection shortcut.
    assert PRN18_PRESETS == ["cifar100_prn18", "cifar10_prn18", "svhn_prn18", "tiny_imagenet_prn18"]
    for name in PRN18_PRESETS:
        cfg = compose([f"experiment=iseat/{name}", "logger=none", "model.width=0.0625"])
        assert cfg.model.name == "preact_resnet18" and cfg.model.shortcut_input == "raw", name
        net = model_from_config(cfg.model, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3)
        assert {b.shortcut_input for b in net.modules() if hasattr(b, "shortcut")} == {"raw"}, name
    # Other ISEAT presets are not PreActResNet-18 models and do not carry the key.
    others = [p for p in (CONF / "experiment" / "iseat").glob("*.yaml") if p.stem not in PRN18_PRESETS]
    assert others and all("shortcut_input" not in p.read_text() for p in others)


@pytest.mark.parametrize("gamma,lam,model_passes,proxy_passes", [(0.01, 0.1, K + 2, 1), (0.01, 0.0, K + 1, 1),
                                                                 (0.0, 0.1, K + 2, 0)])  # fmt: skip
def test_forward_pass_count(model, data, gamma, lam, model_passes, proxy_passes) -> None:
    x, y = data
    defense = _defense()
    addon = _iseat(model, defense, lam=[lam], gamma=[gamma])
    proxy = addon.awp.proxy(model)
    counts = {"model": 0, "proxy": 0}
    model.register_forward_hook(lambda *_: counts.__setitem__("model", counts["model"] + 1))
    proxy.register_forward_hook(lambda *_: counts.__setitem__("proxy", counts["proxy"] + 1))
    TrainStep(model, defense, _sgd(model), [addon])(x, y)
    # K attack forwards (the first at x with a zero start) + the clean forward at theta (lam > 0) + the
    # adversarial forward at theta+nu; the proxy's one forward for nu. K+3 with both on: the released code's.
    assert counts == {"model": model_passes, "proxy": proxy_passes}
    assert (defense.attack.forward_passes, defense.attack.backward_passes) == (K, K)


# ----------------------------------------------------------------------------- docs/methods/iseat.md#tests


def test_av_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    av = torch.linspace(-0.5, 2.0, 100, dtype=torch.float64)[torch.randperm(100, generator=g)]
    s = av_statistics(av)
    ordered = torch.sort(av).values
    assert math.isclose(s["sd"], float(((av - av.mean()) ** 2).mean().sqrt()), rel_tol=1e-12)
    assert math.isclose(s["top"], float(ordered[-10:].mean()), rel_tol=1e-12)
    assert math.isclose(s["bottom"], float(ordered[:10].mean()), rel_tol=1e-12)
    assert s["high_pct"] == float((av >= 1).sum()) and s["low_pct"] == float((av <= 0).sum())
    assert 0 < s["low_pct"] < 100 and 0 < s["high_pct"] < 100


def test_margin_search_matches_the_analytic_boundary_distance() -> None:
    # Two classes; class 1 iff m(x) = x0 - x1 + 0.5 x2 - 0.1 > 0.
    lin = nn.Linear(4, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0, 0, 0], [1.0, -1.0, 0.5, 0]]))
        lin.bias.copy_(torch.tensor([0.0, -0.1]))
    x = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.3, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5],
                      [0.1, 0.9, 0.1, 0.5], [0.1, 0.9, 0.9, 0.5]], dtype=torch.float64)  # fmt: skip
    d = torch.tensor(
        [[-1.0, 0, 0, 0], [1, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [1, 0, 1, 0]], dtype=torch.float64
    )
    mu = margin_along_direction(lin, x, 3 * d)  # the direction's length does not matter
    r2 = math.sqrt(2)
    # Rows: plain crossing; diagonal direction; moving away (never flips); a crossing at mu = 1.7 that
    # clipping to [0, 1] prevents; a crossing moved from 0.3*sqrt(2) to 0.4*sqrt(2) by clipping x2 at 1.
    expected = torch.tensor([0.15, 0.05 / r2, 50.0, 50.0, 0.4 * r2], dtype=torch.float64)
    torch.testing.assert_close(mu, expected, rtol=0, atol=1e-5)


def test_smoke_two_epochs_with_lambda_warmup() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 3, 8, 8, generator=g), torch.randint(0, 2, (256,), generator=g)
    defense = _defense()
    addon = _iseat(net, defense, milestones=[1], lam=[0, 0.1], gamma=[0.007])
    step = TrainStep(net, defense, _sgd(net), [addon])
    for epoch in range(2):
        addon.on_epoch_start(epoch)
        for i in range(0, 256, 32):
            metrics = step(x[i : i + 32], y[i : i + 32])
            assert torch.isfinite(metrics["loss"])
            assert ("iseat/lsiw" in metrics) == (epoch == 1)
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ----------------------------------------------------------------------------- pipeline contract


@pytest.mark.parametrize("name,start,bn_mode", [("pgd_at", "uniform", "train"), ("trades", "normal", "eval"),
                                                ("mart", "normal", "eval")])  # fmt: skip
def test_zero_strength_step_is_exactly_the_base_step(model, name, start, bn_mode) -> None:
    twin = copy.deepcopy(model)
    d1, d2 = _defense(name, start, bn_mode), _defense(name, start, bn_mode)
    runs = []
    for net, defense, addons in ((model, d1, [_iseat(model, d1, lam=[0.0], gamma=[0.0])]), (twin, d2, [])):
        step = TrainStep(net, defense, _sgd(net), addons)
        torch.manual_seed(5)
        losses = [step(x, y)["loss"] for x, y in _batches(2)]
        runs.append((losses, torch.get_rng_state()))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert torch.equal(runs[0][1], runs[1][1])  # same random stream
    for (k, v), w in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(v, w), k


def test_state_dict_round_trip(model, tmp_path) -> None:
    make = lambda: _iseat(model, _defense(), milestones=[100, 150], warm_start_epochs=5)  # noqa: E731
    a, b = make(), make()
    for epoch, expected in [(120, (0.1, 0.007, 1.0)), (2, (0.0, 0.0, 0.4))]:
        a.on_epoch_start(epoch)
        torch.save(a.state_dict(), tmp_path / "addon.pt")
        b.on_epoch_start(0)
        b.load_state_dict(torch.load(tmp_path / "addon.pt"))
        assert (b.epoch, b.lam_t, b.gamma_t, b.ramp) == (epoch, *expected)
        assert (b.awp.gamma, b.awp.epoch) == (a.awp.gamma, epoch)


@pytest.mark.parametrize(
    "override,key,allowed",
    [
        ("addons.iseat.gamma=-0.1", "addons.iseat.gamma=-0.1", "allowed a number >= 0"),
        ("addons.iseat.lam=[0,-1]", "addons.iseat.lam=", "allowed a number >= 0"),
        ("addons.iseat.weighting=cubic", "addons.iseat.weighting='cubic'", "allowed: linear, top10, uniform"),
        ("addons.iseat.pairing=both", "addons.iseat.pairing='both'", "allowed: lsiw, lsi, trades_awp"),
        ("addons.iseat.top_fraction=0", "addons.iseat.top_fraction=0.0", "allowed 0 < value <= 1"),
        ("addons.iseat.warm_start_epochs=-2", "addons.iseat.warm_start_epochs=-2", "allowed an integer >= 0"),
        ("trainer=cosine", "addons.iseat.lam=[0.0, 0.1]", "no piecewise milestones"),
        ("defense=standard", "addons=[iseat]", "supported: pgd_at, trades, mart"),
        ("defense=awp", "defense.awp.enabled=true", "two weight perturbations"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(compose, override, key, allowed) -> None:
    with pytest.raises(ConfigError) as err:
        validate_train_config(compose(["addons=[iseat]", "logger=none", override]))
    assert key in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("defense", ["pgd_at", "trades", "mart"])
def test_default_config_validates(compose, defense) -> None:
    validate_train_config(compose(["addons=[iseat]", "logger=none", f"defense={defense}"]))


E2E = ["debug=fast", "logger=none", "trainer.progress=false", "eval=quick", "eval.n_examples=16",
       "eval.checkpoints=[last]", "dataset.train_limit=64", "trainer.batch_size=32",
       "addons=[iseat]"]  # fmt: skip


@pytest.mark.parametrize("defense", ["pgd_at", "trades", "mart"])
def test_end_to_end_run(compose, tmp_path, defense) -> None:
    res = train_run(compose([*E2E, f"defense={defense}"]), tmp_path / "run")
    attacks = res["eval"]["last"]["attacks"]
    assert {"clean", "pgd20"} <= set(attacks)
    assert 0 <= attacks["pgd20"]["accuracy"] <= attacks["clean"]["accuracy"] <= 100
    assert res["config"]["addons"]["iseat"]["gamma"] == [0.007]
    assert math.isfinite(res["train"]["history"][-1]["train/loss"])


def test_end_to_end_run_with_the_regularizer_on(compose, tmp_path) -> None:
    res = train_run(compose([*E2E, "defense=pgd_at", "addons.iseat.lam=[0.1]"]), tmp_path / "run")
    assert {"clean", "pgd20"} <= set(res["eval"]["last"]["attacks"])
    assert math.isfinite(res["train"]["history"][-1]["train/loss"])
