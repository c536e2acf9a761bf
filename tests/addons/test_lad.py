"""LAD / LAD-SM (docs/methods/lad.md#tests): recorded adjoints, exact perturbations, identities with the base
step."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from robust_train.addons import build_addons, check_addon, check_addons
from robust_train.addons.base import AddonContext
from robust_train.addons.lad import EVAL_NOISE_SEED_OFFSET, LAD, LADConfig
from robust_train.addons.lad_ops import NoisyEnsemble, SiteNoise, StateTap, perturbation_hooks, site_modules
from robust_train.attacks import ThreatModel
from robust_train.builders import model_from_config, optimizer_from_config, threat_from_config
from robust_train.config import validate_train_config
from robust_train.data import build_dataset
from robust_train.defenses import DefenseConfig, build_defense
from robust_train.defenses.base import Defense, pgd_training_attack
from robust_train.defenses.losses import kl_clean_adv, mart_loss
from robust_train.errors import ConfigError
from robust_train.models.base import pool_flatten
from robust_train.models.preact_resnet import PreActResNet
from robust_train.registry import DEFENSES, Entry
from robust_train.schema import plain
from robust_train.step_types import LABEL, StepForwards, StepLoss, Term
from robust_train.training.step import TrainStep

CONF = Path(__file__).resolve().parents[2] / "robust_train" / "conf"
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 2
SEED = 5


# ----------------------------------------------------------------- fixtures and helpers
def tiny_preact(seed: int = 0) -> PreActResNet:
    """1 block per stage (the 2nd and 3rd down-sample), adaptive pool; float64."""
    torch.manual_seed(seed)
    return PreActResNet("tiny_preact", 4, (4, 8, 8), (1, 1, 1), 10, (0.5,) * 3, (0.25,) * 3).double()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)


def defense(name: str, awp: bool = False):
    attack = None
    if name != "standard":
        start, bn = ("uniform", "train") if name == "pgd_at" else ("normal", "eval")
        attack = {"name": "pgd", "steps": STEPS, "step": ALPHA, "restarts": 1, "random_start": start,
                  "bn_mode": bn}  # fmt: skip
    cfg = {"name": name, "attack": attack, "awp": {"enabled": awp, "gamma": 0.01}}
    if name in ("trades", "mart"):
        cfg["beta"] = 6.0
    return build_defense(OmegaConf.create(cfg), ThreatModel("linf", EPS))


def make_lad(model: nn.Module, base, seed: int = 0, **overrides) -> LAD:
    """LAD with the shipped defaults (its schema's) and `overrides`."""
    cfg = OmegaConf.merge(OmegaConf.create(plain(LADConfig())), OmegaConf.create(overrides))
    ctx = AddonContext(cfg=None, model=model, defense=base, threat=base.threat, num_classes=10, seed=seed)
    return LAD(cfg, ctx)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def manual_forward(model: PreActResNet, x, pre=None, post=None):
    """Hook-free forward returning (logits, block inputs, block outputs), with optional additive deltas."""
    h = model.conv1(model.normalize(x))
    ins, outs = [], []
    for n, name in enumerate(model.block_layers):
        if pre is not None:
            h = h + pre[n]
        ins.append(h)
        h = model.get_submodule(name).forward(h)
        if post is not None:
            h = h + post[n]
        outs.append(h)
    return model.fc(pool_flatten(F.relu(model.bn(h)))), ins, outs


def manual_adjoints(model: PreActResNet, x, y, freeze_bn: bool = True):
    """(a_0 at the block-0 input, [a_1..a_N] at the block outputs, block outputs, logits) of CE by explicit
    autograd.grad; the logits keep their graph."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    logits, ins, outs = manual_forward(model, x)
    loss = F.cross_entropy(logits, y)
    a_out = torch.autograd.grad(loss, outs, retain_graph=True)
    (a0,) = torch.autograd.grad(loss, ins[0], retain_graph=True)
    if freeze_bn:
        model.load_state_dict(saved)
    return a0, list(a_out), outs, logits


def manual_deltas(a0, a_out, eta: float, scheme: str):
    """Per-block (pre, post) additions of docs/methods/lad.md#lad-sm-pass (down-sampling blocks: (eta/2)
    a_{n+1} after)."""
    a_in = [a0, *a_out[:-1]]
    if scheme == "lt":
        return None, [eta * a for a in a_out]
    post = [0.25 * eta * (ai + ao) if ai.shape == ao.shape else 0.5 * eta * ao for ai, ao in zip(a_in, a_out)]
    return [0.5 * eta * a for a in a_in], post


def assert_same_state(a: nn.Module, b: nn.Module, exact: bool) -> None:
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if exact:
            assert torch.equal(va, vb), name
        else:
            torch.testing.assert_close(va, vb, rtol=0, atol=1e-10, msg=name)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ----------------------------------------------------------------- docs/methods/lad.md#tests
@pytest.mark.parametrize(
    "name,awp,scheme",
    [("standard", False, "lt"), ("pgd_at", False, "lt"), ("pgd_at", False, "sm"), ("trades", False, "sm"),
     ("mart", False, "lt"), ("pgd_at", True, "lt")],
)  # fmt: skip
def test_eta_zero_is_the_base_step_exactly(data, name: str, awp: bool, scheme: str) -> None:
    x, y = data
    model_a = tiny_preact()
    model_b = copy.deepcopy(model_a)
    base_a, base_b = defense(name, awp), defense(name, awp)
    # TRADES: eta = 0 and gamma = 1 is plain TRADES (docs/methods/lad.md#tests); gamma is unused by the
    # others.
    lad = make_lad(model_a, base_a, eta=0.0, trades_gamma=1.0, scheme=scheme)
    torch.manual_seed(SEED)
    m_a = TrainStep(model_a, base_a, sgd(model_a), [lad])(x, y)
    rng_a = torch.get_rng_state()
    torch.manual_seed(SEED)
    m_b = TrainStep(model_b, base_b, sgd(model_b))(x, y)
    assert torch.equal(m_a["loss"], m_b["loss"])
    assert torch.equal(rng_a, torch.get_rng_state())
    assert_same_state(model_a, model_b, exact=True)  # parameters and BN buffers


def test_trades_eta_zero_gamma_half_is_the_mixed_objective(data) -> None:
    x, y = data
    model_a = tiny_preact()
    model_b = copy.deepcopy(model_a)
    base_a, base_b = defense("trades"), defense("trades")
    lad = make_lad(model_a, base_a, eta=0.0, trades_gamma=0.5)
    torch.manual_seed(SEED)
    metrics = TrainStep(model_a, base_a, sgd(model_a), [lad])(x, y)

    torch.manual_seed(SEED)
    x_adv = base_b.craft(model_b, x, y, base_b.inner_objective(x, y))
    model_b.train()
    opt = sgd(model_b)
    lc, la = model_b(x), model_b(x_adv)
    loss = 0.5 * F.cross_entropy(lc, y) + 0.5 * F.cross_entropy(la, y) + 6.0 * kl_clean_adv(la, lc).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=0, atol=1e-10)
    assert_same_state(model_a, model_b, exact=False)


@pytest.mark.parametrize(
    "name,scheme",
    [("standard", "lt"), ("pgd_at", "lt"), ("pgd_at", "sm"), ("trades", "sm"), ("mart", "lt")],
)
def test_lad_step_matches_the_hand_written_algorithm(data, name: str, scheme: str) -> None:
    """One step against docs/methods/lad.md#step written out: recording (BN frozen), LAD pass, the base's
    loss."""
    x, y = data
    eta = 3.0
    model_a = tiny_preact()
    model_b = copy.deepcopy(model_a)
    base_a, base_b = defense(name), defense(name)
    lad = make_lad(model_a, base_a, eta=eta, scheme=scheme, trades_gamma=0.5)
    torch.manual_seed(SEED)
    metrics = TrainStep(model_a, base_a, sgd(model_a), [lad])(x, y)

    torch.manual_seed(SEED)
    x_adv = None if base_b.attack is None else base_b.craft(model_b, x, y, base_b.inner_objective(x, y))
    model_b.train()
    opt = sgd(model_b)
    if name in ("standard", "pgd_at"):
        x_in = x if x_adv is None else x_adv
        a0, a_out, _, _ = manual_adjoints(model_b, x_in, y, freeze_bn=True)
        pre, post = manual_deltas(a0, a_out, eta, scheme)
        loss = F.cross_entropy(manual_forward(model_b, x_in, pre, post)[0], y)
    else:
        lc = model_b(x)
        # The shared plain f(x') is the recording forward; its graph also serves the KL term.
        a0, a_out, _, la = manual_adjoints(model_b, x_adv, y, freeze_bn=False)
        pre, post = manual_deltas(a0, a_out, eta, scheme)
        l_lad = manual_forward(model_b, x_adv, pre, post)[0]
        if name == "trades":
            ce_mix = 0.5 * F.cross_entropy(lc, y) + 0.5 * F.cross_entropy(l_lad, y)
            loss = ce_mix + 6.0 * kl_clean_adv(la, lc).mean()
        else:
            full, bce_plain, _ = mart_loss(lc, la, y, 6.0)
            loss = full - bce_plain + mart_loss(lc.detach(), l_lad, y, 6.0)[1]
    opt.zero_grad()
    loss.backward()
    opt.step()
    torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=0, atol=1e-10)
    assert_same_state(model_a, model_b, exact=False)  # parameters and BN buffers (recording frozen)


class _PairedConfig(DefenseConfig):
    name: Literal["paired"] = "paired"
    attack: dict[str, Any] | None = pgd_training_attack("uniform", "eval")


class _Paired(Defense):
    """A defense LAD knows only by its declarations: CE(f(x'), y) (the label term, with its function)
    + 0.5 * mean ||f(x') - f(x)||^2, reading both branches."""

    name = "paired"
    train_branch = "adv"
    label_branch = "adv"
    outer_branches = ("adv", "clean")

    def outer_loss(self, out: StepForwards) -> StepLoss:
        z_clean, z_adv = out.logits("clean"), out.logits("adv")
        ce = F.cross_entropy(z_adv, out.y)
        pair = (z_adv - z_clean).pow(2).sum(1).mean()
        terms = {"ce_adv": Term(ce, role=LABEL, fn=F.cross_entropy), "pairing": Term(pair, weight=0.5)}
        return StepLoss(logits=z_adv, terms=terms)


@pytest.mark.parametrize("eta", [0.0, 3.0])
def test_lad_replaces_the_label_term_of_a_defense_it_does_not_know_by_name(data, monkeypatch, eta) -> None:
    """The label term reads the training branch, which the pairing term reads too: LAD removes it and adds
    its function on an extra LAD forward; the shared plain f(x') is the recording forward (as for MART)."""
    monkeypatch.setitem(DEFENSES._entries, "paired", Entry("paired", _Paired, _PairedConfig, __name__))
    x, y = data
    node = {"name": "paired", "attack": {"name": "pgd", "steps": STEPS, "step": ALPHA, "bn_mode": "eval"}}
    model_a = tiny_preact()
    model_b = copy.deepcopy(model_a)
    base_a, base_b = (build_defense(node, ThreatModel("linf", EPS)) for _ in range(2))
    lad = make_lad(model_a, base_a, eta=eta)
    assert not lad.in_place and lad._extra_branch_weight() == 1.0
    torch.manual_seed(SEED)
    metrics = TrainStep(model_a, base_a, sgd(model_a), [lad])(x, y)

    torch.manual_seed(SEED)
    x_adv = base_b.craft(model_b, x, y, base_b.inner_objective(x, y))
    model_b.train()
    opt = sgd(model_b)
    lc = model_b(x)
    a0, a_out, _, la = manual_adjoints(model_b, x_adv, y, freeze_bn=False)
    loss = F.cross_entropy(la, y) + 0.5 * (la - lc).pow(2).sum(1).mean()
    if eta > 0:
        l_lad = manual_forward(model_b, x_adv, *manual_deltas(a0, a_out, eta, "lt"))[0]
        loss = loss - F.cross_entropy(la, y) + F.cross_entropy(l_lad, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    torch.testing.assert_close(metrics["loss"], loss.detach(), rtol=0, atol=1e-10)
    assert_same_state(model_a, model_b, exact=False)
    assert ("lad/label_removed" in metrics) == (eta > 0)


# ----------------------------------------------------------------- docs/methods/lad.md#tests
def test_recorded_adjoints_equal_explicit_autograd_and_leave_bn_untouched(data) -> None:
    x, y = data
    model = tiny_preact().train()
    lad = make_lad(model, defense("standard"), scheme="sm")
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    adj = lad.record(model, x, y)
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k
    a0, a_out, _, _ = manual_adjoints(copy.deepcopy(model), x, y)
    assert len(adj.out) == len(model.block_layers) == 3
    for n, a in enumerate(a_out):
        torch.testing.assert_close(adj.out[n], a, rtol=0, atol=1e-12)
        assert not adj.out[n].requires_grad
    torch.testing.assert_close(adj.inp[0], a0, rtol=0, atol=1e-12)
    # Consecutive blocks: the input of block n+1 is the output of block n, so a_{n+1} is shared.
    for n in range(1, 3):
        assert torch.equal(adj.inp[n], adj.out[n - 1])
    assert all(p.grad is None for p in model.parameters())  # activation gradients only
    assert no_hooks_left(model)


def _perturbations(model: PreActResNet, lad: LAD, adj, x, eta: float, scheme: str):
    """(pre, post) additions actually made in a LAD pass, measured with hooks behind LAD's."""
    modules = site_modules(model, lad.site_names)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    with perturbation_hooks(modules, adj, eta, scheme):
        handles = [m.register_forward_hook(lambda m, a, o: seen.append((a[0], o))) for m in modules]
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
    stem = model.conv1(model.normalize(x)).detach()
    pre, post = [], []
    with torch.no_grad():
        for n, (module, (inp, out)) in enumerate(zip(modules, seen)):
            before = stem if n == 0 else seen[n - 1][1]
            pre.append(inp - before)
            post.append(out - module.forward(inp))
    return pre, post


@pytest.mark.parametrize("scheme", ["lt", "sm"])
def test_lad_pass_adds_exactly_the_scheme_perturbations(data, scheme: str) -> None:
    x, y = data
    model = tiny_preact().train()
    lad = make_lad(model, defense("standard"), scheme=scheme)
    adj = lad.record(model, x, y)
    eta = 7.0
    pre, post = _perturbations(model, lad, adj, x, eta, scheme)
    for n in range(3):
        assert post[n].shape == adj.out[n].shape  # incl. the down-sampling blocks 1 and 2
        if scheme == "lt":
            assert torch.equal(pre[n], torch.zeros_like(pre[n]))
            torch.testing.assert_close(post[n], eta * adj.out[n], rtol=0, atol=1e-12)
        else:
            torch.testing.assert_close(pre[n], 0.5 * eta * adj.inp[n], rtol=0, atol=1e-12)
            same = adj.inp[n].shape == adj.out[n].shape
            want = 0.25 * eta * (adj.inp[n] + adj.out[n]) if same else 0.5 * eta * adj.out[n]
            torch.testing.assert_close(post[n], want, rtol=0, atol=1e-12)
    # Blocks 1 and 2 down-sample: their post-step falls back to (eta/2) a_{n+1}.
    assert [adj.out[n].shape[1:] for n in range(3)] == [(4, 8, 8), (8, 4, 4), (8, 2, 2)]


def test_perturbations_scale_with_eta_and_adjoints_do_not(data) -> None:
    x, y = data
    model = tiny_preact().train()
    lad_1, lad_2 = (
        make_lad(model, defense("standard"), eta=1.0),
        make_lad(model, defense("standard"), eta=100.0),
    )
    adj_1, adj_2 = lad_1.record(model, x, y), lad_2.record(model, x, y)
    for a, b in zip(adj_1.out, adj_2.out):
        assert torch.equal(a, b)
    eta = 4.0
    _, post_1 = _perturbations(model, lad_1, adj_1, x, eta, "lt")
    _, post_2 = _perturbations(model, lad_1, adj_1, x, 2 * eta, "lt")
    for n in range(3):
        torch.testing.assert_close(post_1[n].norm(), eta * adj_1.out[n].norm(), rtol=1e-10, atol=0)
        torch.testing.assert_close(post_2[n], 2 * post_1[n], rtol=0, atol=1e-12)


def test_first_order_loss_increase_matches_adjoint_norms(data) -> None:
    x, y = data
    model = tiny_preact().train()
    lad = make_lad(model, defense("standard"), scheme="sm")
    adj = lad.record(model, x, y)
    modules = site_modules(model, lad.site_names)
    with torch.no_grad():
        base = F.cross_entropy(model(x), y)
    lt = sum((a * a).sum() for a in adj.out)
    sm = 0.0
    for ai, ao in zip(adj.inp, adj.out):
        post = (
            0.25 * (ai * ao).sum() + 0.25 * (ao * ao).sum() if ai.shape == ao.shape else 0.5 * (ao * ao).sum()
        )
        sm = sm + 0.5 * (ai * ai).sum() + post
    for scheme, first_order in (("lt", lt), ("sm", sm)):
        errors = []
        for eta in (1e-4, 1e-6):
            with perturbation_hooks(modules, adj, eta, scheme), torch.no_grad():
                increase = F.cross_entropy(model(x), y) - base
            assert increase > 0  # ascent
            errors.append(abs(increase / (eta * first_order) - 1))
        assert errors[1] < 1e-5 and errors[0] < 1e-3
        assert errors[1] < errors[0] / 10  # the error is O(eta)


# ----------------------------------------------------------------- docs/methods/lad.md#tests
def test_no_leakage_after_a_step(data) -> None:
    x, y = data
    model = tiny_preact()
    keys = list(model.state_dict())
    base = defense("pgd_at")
    lad = make_lad(model, base, eta=5.0, scheme="sm", noise={"enabled": True, "std": 0.1})
    torch.manual_seed(SEED)
    TrainStep(model, base, sgd(model), [lad])(x, y)
    assert no_hooks_left(model)
    assert list(model.state_dict()) == keys
    # Per-step state lives in the step's forwards, never on the add-on.
    assert not any(isinstance(v, StateTap | StepForwards) for v in vars(lad).values())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), manual_forward(model, x)[0], rtol=0, atol=1e-12)
    assert all(not a.requires_grad for a in lad.record(model.train(), x, y).out)


@pytest.mark.parametrize("name,extra", [("standard", 1), ("pgd_at", 1), ("trades", 1)])
def test_forward_pass_count(data, name: str, extra: int) -> None:
    """PGD-AT: K+1 forwards -> K+2 (docs/methods/lad.md#cost); TRADES shares its plain f(x') as the recording
    forward."""
    x, y = data
    counts = []
    for with_lad in (False, True):
        model = tiny_preact()
        base = defense(name)
        addons = [make_lad(model, base, eta=2.0)] if with_lad else []
        calls: list[int] = []
        handle = model.register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        torch.manual_seed(SEED)
        TrainStep(model, base, sgd(model), addons)(x, y)
        handle.remove()
        counts.append(len(calls))
    base_count = {"standard": 1, "pgd_at": STEPS + 1, "trades": STEPS + 3}[name]
    assert counts == [base_count, base_count + extra]


def test_sum_reduced_recording_with_eta_over_b_is_the_mean_step(data) -> None:
    x, y = data
    models = [tiny_preact(), tiny_preact()]
    for model, reduction in zip(models, ("mean", "sum")):
        base = defense("pgd_at")
        lad = make_lad(model, base, eta=20.0, scheme="sm", loss_reduction=reduction)
        torch.manual_seed(SEED)
        TrainStep(model, base, sgd(model), [lad])(x, y)
    assert_same_state(models[0], models[1], exact=False)
    assert not torch.equal(models[0].conv1.weight, tiny_preact().conv1.weight)


# ----------------------------------------------------------------- docs/methods/lad.md#tests
def test_noise_std_zero_reproduces_the_deterministic_step(data) -> None:
    x, y = data
    models, rngs = [tiny_preact(), tiny_preact()], []
    for model, noise in zip(models, ({"enabled": False}, {"enabled": True, "std": 0.0})):
        base = defense("pgd_at")
        lad = make_lad(model, base, eta=5.0, noise=noise)
        torch.manual_seed(SEED)
        TrainStep(model, base, sgd(model), [lad])(x, y)
        rngs.append(torch.get_rng_state())
    assert_same_state(models[0], models[1], exact=True)
    assert torch.equal(rngs[0], rngs[1])


def test_training_noise_uses_its_own_generator(data) -> None:
    """Noise changes the step but not the global RNG stream (data order, attack starts)."""
    x, y = data
    model_a, model_b = tiny_preact(), tiny_preact()
    base_a, base_b = defense("pgd_at"), defense("pgd_at")
    lad = make_lad(model_a, base_a, eta=0.0, noise={"enabled": True, "std": 0.1})
    torch.manual_seed(SEED)
    TrainStep(model_a, base_a, sgd(model_a), [lad])(x, y)
    rng_a = torch.get_rng_state()
    torch.manual_seed(SEED)
    TrainStep(model_b, base_b, sgd(model_b))(x, y)
    assert torch.equal(rng_a, torch.get_rng_state())
    assert not torch.equal(model_a.conv1.weight, model_b.conv1.weight)
    assert no_hooks_left(model_a)


def test_eval_wrapper_averages_noisy_forwards(data) -> None:
    x, _ = data
    model = tiny_preact().eval()
    lad = make_lad(model, defense("pgd_at"), noise={"enabled": True, "std": 0.1, "eval_samples": 3})
    wrapped = lad.wrap_for_eval(model)
    assert isinstance(wrapped, NoisyEnsemble)
    with torch.no_grad():
        mean = wrapped(x)
        plain = model(x)
        single = NoisyEnsemble(
            model,
            lad.site_names,
            SiteNoise(0.1, "absolute", EVAL_NOISE_SEED_OFFSET),
            samples=1,
            grad_samples=1,
        )
        draws = [single(x) for _ in range(3)]
    torch.testing.assert_close(mean, sum(draws) / 3, rtol=0, atol=1e-12)
    assert not torch.allclose(draws[0], draws[1]) and not torch.allclose(mean, plain)
    # An attack's gradient step sees one noise draw per forward (noise.attack_samples = 1).
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    wrapped(x.clone().requires_grad_(True))
    handle.remove()
    assert len(calls) == 1 and no_hooks_left(model)


def test_no_noise_when_disabled(data) -> None:
    x, _ = data
    model = tiny_preact().eval()
    lad = make_lad(model, defense("pgd_at"))
    assert lad.noise is None and lad.wrap_for_eval(model) is model
    with torch.no_grad(), lad.forward_context(StepForwards(model, x, None, x), "adv"):
        hooked = model(x)
    with torch.no_grad():
        assert torch.equal(hooked, model(x))


# ----------------------------------------------------------------- diagnostic, schedule, state
def test_ratio_diagnostic_is_block0_output_over_a0(data) -> None:
    x, y = data
    model = tiny_preact().train()
    lad = make_lad(model, defense("standard"))
    lad.record(model, x, y)
    a0, _, outs, _ = manual_adjoints(copy.deepcopy(model), x, y)
    summary = lad.ratio_summary()
    assert summary is not None and summary["steps"] == 1
    assert summary["ratio_mean"] == pytest.approx(float(outs[0].detach().norm() / a0.norm()), rel=1e-10)
    lad.on_epoch_start(1)
    assert lad.ratio_history[0]["epoch"] == 1 and lad.ratio_summary() is None
    assert lad.epoch_metrics()["lad/ratio_mean"] == summary["ratio_mean"]


def test_state_dict_round_trip_restores_schedule_history_and_noise_stream(data) -> None:
    x, y = data
    model = tiny_preact()
    base = defense("pgd_at")
    over = {"eta": 10.0, "eta_warmup_epochs": 1, "eta_ramp_epochs": 2, "noise": {"enabled": True}}
    lad = make_lad(model, base, **over)
    assert [lad.eta_at(e) for e in range(4)] == [0.0, 5.0, 10.0, 10.0]
    assert lad.eta_now == 0.0
    lad.on_epoch_start(1)
    torch.manual_seed(SEED)
    TrainStep(model, base, sgd(model), [lad])(x, y)
    buffer = io.BytesIO()
    torch.save(lad.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)

    restored = make_lad(model, base, **over)
    restored.load_state_dict(state)
    assert restored.epoch == 1 and restored.eta_now == 5.0
    assert [h["epoch"] for h in restored.ratio_history] == [2]
    probe = torch.zeros(2, 3)
    torch.testing.assert_close(restored.noise.sample(probe), lad.noise.sample(probe), rtol=0, atol=0)


def test_check_config_names_bad_keys_and_ranges() -> None:
    good = OmegaConf.create(plain(LADConfig()))
    assert check_addon("lad", good) == []
    bad = OmegaConf.merge(
        good,
        {"eta": -1.0, "scheme": "rk4", "iters": 3, "trades_gamma": 1.5, "loss_reduction": "max",
         "sites": [], "noise": {"eval_samples": 0, "scale_mode": "layer", "std": -0.1}},
    )  # fmt: skip
    text = "\n".join(check_addon("lad", bad))
    for key, allowed in [
        ("addons.lad.eta=-1.0", "0 <= value"),
        ("addons.lad.scheme='rk4'", "lt, sm"),
        ("addons.lad.iters=3", "allowed: 1"),
        ("addons.lad.trades_gamma=1.5", "0 <= value <= 1"),
        ("addons.lad.loss_reduction='max'", "mean, sum"),
        ("addons.lad.sites=", "residual_blocks"),
        ("addons.lad.noise.eval_samples=0", ">= 1"),
        ("addons.lad.noise.scale_mode='layer'", "absolute, relative"),
        ("addons.lad.noise.std=-0.1", "0 <= value"),
    ]:
        assert key in text and allowed in text, key


def test_bad_layer_names_and_blockless_models_fail_at_build_time(tiny_model) -> None:
    model = tiny_preact()
    with pytest.raises(ConfigError, match=r"'layer9\.0'.*known layers: layer1\.0"):
        make_lad(model, defense("pgd_at"), sites=["layer1.0", "layer9.0"])
    with pytest.raises(ConfigError, match="declares no block_layers"):
        make_lad(tiny_model.double(), defense("pgd_at"))
    lad = make_lad(model, defense("pgd_at"), sites=["layer2.0"])
    assert lad.site_names == ["layer2.0"]


def test_config_validation_reports_lad_problems(compose) -> None:
    cfg = compose(["addons=[lad]", "addons.lad.eta=-2", "addons.lad.scheme=euler", "logger=none"])
    assert any("addons.lad.eta" in p for p in check_addons(cfg))
    with pytest.raises(ConfigError, match="addons.lad.scheme='euler'"):
        validate_train_config(cfg)


# ----------------------------------------------------------------- docs/methods/lad.md#tests
# natural, PGD-AT, TRADES and MART compose and train with LAD in the end-to-end runs below.
@pytest.mark.parametrize("name", ["awp", "trades_awp"])
def test_composes_with_every_base_defense_and_runs_one_step(compose, name: str) -> None:
    overrides = ["addons=[lad]", f"defense={name}", "dataset=synthetic", "dataset.train_size=24",
                 "dataset.test_size=4", "dataset.val_size=4", "dataset.image_shape=[3,8,8]",
                 "model.width=0.0625", "logger=none", "addons.lad.scheme=sm"]  # fmt: skip
    if name != "standard":
        overrides.append("defense.attack.steps=1")
    cfg = compose(overrides)
    validate_train_config(cfg)
    data = build_dataset(cfg.dataset, 0)
    model = model_from_config(cfg.model, data)
    threat = threat_from_config(cfg.threat)
    base = build_defense(cfg.defense, threat)
    addons = build_addons(
        cfg, {"model": model, "defense": base, "threat": threat, "num_classes": 10, "seed": 0}
    )
    assert [a.name for a in addons] == ["lad"] and addons[0].scheme == "sm"
    step = TrainStep(
        model, base, optimizer_from_config(cfg.trainer.optimizer, model, torch.device("cpu")), addons
    )
    before = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(0)
    metrics = step(data.train_x[:4].float() / 255, data.train_y[:4])
    assert torch.isfinite(metrics["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert addons[0].ratio_summary() is not None and no_hooks_left(model)


@pytest.mark.parametrize("name", ["standard", "pgd_at", "trades", "mart"])
def test_end_to_end_run(compose, tmp_path, name: str) -> None:
    from robust_train.commands.train import train_run

    overrides = ["debug=fast", "logger=none", "trainer.progress=false", "eval=quick", "eval.n_examples=16",
                 "eval.checkpoints=[last]", "dataset.train_limit=64", "trainer.batch_size=32", "addons=[lad]",
                 f"defense={name}", "trainer.validation.max_examples=16", "trainer.validation.pgd_steps=1",
                 "eval.attacks.pgd20.steps=3"]  # fmt: skip
    if name != "standard":
        overrides.append("defense.attack.steps=3")
    if name == "pgd_at":
        # The stochastic variant: evaluation goes through the noisy ensemble.
        overrides += ["addons.lad.noise.enabled=true", "addons.lad.noise.eval_samples=4"]
    results = train_run(compose(overrides), tmp_path / "run")
    attacks = results["eval"]["last"]["attacks"]
    assert {"clean", "pgd20"} <= set(attacks)
    assert all(0.0 <= attacks[k]["accuracy"] <= 100.0 for k in ("clean", "pgd20"))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["addons"]["lad"]["ratio_epoch"]["steps"] == 2
