"""SLIM (docs/methods/slim.md#tests): dictionary values, draws, gradient routing, constraint, host routing,
exactness."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy import stats

from robust_train.addons import AddonContext, check_addon, check_addons, selected
from robust_train.addons.slim import SLIM, SLIMConfig, candidate_layers, make_dict_loss
from robust_train.attacks import ThreatModel, attack_mode
from robust_train.config import validate_train_config
from robust_train.defenses import build_defense
from robust_train.defenses.losses import kl_clean_adv
from robust_train.errors import ConfigError
from robust_train.models import build_model, forward_with_features
from robust_train.schema import plain
from robust_train.step_types import StepForwards
from robust_train.training.step import TrainStep

CONF = Path(__file__).resolve().parents[2] / "robust_train" / "conf"
DEFAULTS = OmegaConf.create(plain(SLIMConfig()))
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 3
THREAT = ThreatModel("linf", EPS)
LOSSES = ("mse", "ortho", "reverse")
# Base defense (and AWP) combinations SLIM supports.
HOSTS = [("pgd_at", False), ("trades", False), ("mart", False), ("pgd_at", True), ("trades", True)]


def _model(name: str = "resnet18", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, (0.5,) * 3, (0.25,) * 3, width=0.0625).double()


def _data(n: int = 4, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def _defense(name: str, awp: bool = False, bn_mode: str | None = None, start: str | None = None):
    attack = {
        "name": "pgd", "steps": STEPS, "step": ALPHA, "restarts": 1,
        "random_start": start or ("uniform" if name == "pgd_at" else "normal"),
        "bn_mode": bn_mode or ("train" if name == "pgd_at" else "eval"),
    }  # fmt: skip
    cfg = {
        "name": name,
        "attack": attack,
        **({"beta": 6.0} if name in ("trades", "mart") else {}),
        "awp": {"enabled": awp, "gamma": 0.01, "warmup_epochs": 0},
    }
    defense = build_defense(OmegaConf.create(cfg), THREAT)
    defense.on_epoch_start(0)
    return defense


def _slim(model: torch.nn.Module, seed: int = 0, defense=None, **overrides) -> SLIM:
    cfg = OmegaConf.merge(DEFAULTS, overrides)
    ctx = AddonContext(cfg=None, model=model, defense=defense, threat=THREAT, num_classes=10, seed=seed)
    return SLIM(cfg, ctx)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _spy(slim: SLIM, record: list) -> None:
    """Record (x_adv, base_term, draw) of every inner_objective call, then call the real hook."""
    real = slim.inner_objective

    def spy(x_adv, y, logits_adv, feats_adv, clean, model, base_term):
        out = real(x_adv, y, logits_adv, feats_adv, clean, model, base_term)
        d = slim.last_draw
        draw = (tuple(d.layers), tuple(d.losses), tuple(d.lams))
        record.append(
            {"x_adv": x_adv.detach().clone(), "base": base_term.detach(), "logits": logits_adv.detach(),
             "clean": clean.logits(model), "draw": draw}
        )  # fmt: skip
        return out

    slim.inner_objective = spy


# --------------------------------------------------------------------------- docs/methods/slim.md#tests
# dictionary values
@pytest.mark.parametrize("cos_mode", ["flatten", "channel"])
def test_dictionary_values(cos_mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    mse, ortho, rev = (make_dict_loss(n, "sum", cos_mode) for n in LOSSES)
    one = torch.ones(3, dtype=torch.float64)
    assert torch.equal(mse(f, f), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(ortho(f, f), one)
    torch.testing.assert_close(rev(f, f), -one)
    torch.testing.assert_close(ortho(f, -f), one)
    torch.testing.assert_close(rev(f, -f), one)
    # Orthogonal features (disjoint channel supports are orthogonal in both modes).
    a, b = torch.zeros_like(f), torch.zeros_like(f)
    a[:, :2], b[:, 2:] = f[:, :2], f[:, 2:]
    torch.testing.assert_close(ortho(a, b), torch.zeros(3, dtype=torch.float64))
    # Cosine terms are invariant to positive rescaling of either input; mse is the literal squared norm.
    h = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ortho(3.0 * f, 0.5 * h), ortho(f, h))
    torch.testing.assert_close(rev(0.1 * f, 7.0 * h), rev(f, h))
    torch.testing.assert_close(mse(f, h), (f - h).pow(2).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(make_dict_loss("mse", "mean")(f, h), (f - h).pow(2).mean(dim=(1, 2, 3)))
    # All-zero features (dead ReLUs) give finite values and finite gradients.
    z = torch.zeros_like(f, requires_grad=True)
    for loss in (mse, ortho, rev):
        v = loss(torch.zeros_like(f), z)
        (grad,) = torch.autograd.grad(v.sum(), z)
        assert torch.isfinite(v).all() and torch.isfinite(grad).all()


def test_channel_cosine_is_mean_of_per_position_cosines() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = (
        torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64),
    )
    c = F.cosine_similarity(a, b, dim=1).flatten(1)  # (B, H*W)
    torch.testing.assert_close(make_dict_loss("reverse", cos_mode="channel")(a, b), -c.mean(1))
    torch.testing.assert_close(make_dict_loss("ortho", cos_mode="channel")(a, b), c.pow(2).mean(1))
    flat = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    torch.testing.assert_close(make_dict_loss("reverse")(a, b), -flat)


# --------------------------------------------------------------------------- docs/methods/slim.md#tests
# layers and shapes
RESNET_SHAPES = {
    "layer1": (64, 32, 32),
    "layer2": (128, 16, 16),
    "layer3": (256, 8, 8),
    "layer4": (512, 4, 4),
}
WRN_SHAPES = {"block1": (160, 32, 32), "block2": (320, 16, 16), "block3": (640, 8, 8)}


@pytest.mark.parametrize(
    "arch, shapes, n_blocks",
    [("resnet18", RESNET_SHAPES, 8), ("preact_resnet18", RESNET_SHAPES, 8), ("wrn34_10", WRN_SHAPES, 15)],
)
def test_candidate_layers_and_feature_shapes(arch: str, shapes: dict, n_blocks: int) -> None:
    with torch.device("meta"):  # shapes only: full-width models without allocating weights
        model = build_model(arch, 10, (0.5,) * 3, (0.25,) * 3)
        slim = _slim(model)
        _, feats = forward_with_features(model, torch.zeros(2, 3, 32, 32), slim.required_layers())
    assert slim.layers == list(shapes)
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == shapes
    assert len(candidate_layers(model, "block")) == n_blocks
    assert len(_slim(model, granularity="block").layers) == n_blocks


def test_unknown_layer_fails_at_build_naming_known_layers() -> None:
    model = _model()
    with pytest.raises(ConfigError, match=r"'layer9'.*known layers: .*layer4"):
        _slim(model, layers=["layer1", "layer9"])
    with pytest.raises(ConfigError, match=r"'fc9'"):
        _slim(model, fixed_layer="fc9")


# --------------------------------------------------------------------------- exactness at strength zero
@pytest.mark.parametrize(
    "defense_name, awp, zero", [(d, a, "fixed_lambda") for d, a in HOSTS] + [("trades", False, "lam_range")]
)
def test_strength_zero_is_exactly_the_base_step(defense_name: str, awp: bool, zero: str) -> None:
    """docs/methods/slim.md#tests same x_adv; same loss, parameters and global RNG stream after two steps
    (float64, torch.equal)."""
    x, y = _data()
    model_a, model_b = _model(), _model()
    off = {"fixed_lambda": 0.0} if zero == "fixed_lambda" else {"lam_low": 0.0, "lam_high": 0.0}
    step_a = TrainStep(model_a, _defense(defense_name, awp), _sgd(model_a), [_slim(model_a, **off)])
    step_b = TrainStep(model_b, _defense(defense_name, awp), _sgd(model_b))
    for i in range(2):
        torch.manual_seed(10 + i)
        xa = step_a.craft(x, y)
        torch.manual_seed(10 + i)
        xb = step_b.craft(x, y)
        assert torch.equal(xa, xb)
        torch.manual_seed(20 + i)
        ma = step_a(x, y)
        rng_a = torch.get_rng_state()
        torch.manual_seed(20 + i)
        mb = step_b(x, y)
        assert torch.equal(rng_a, torch.get_rng_state())
        assert torch.equal(ma["loss"], mb["loss"])
    for (name, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_disabled_slim_is_not_built(compose) -> None:
    cfg = compose(["addons=[slim]", "addons.slim.enabled=false", "logger=none"])
    assert selected(cfg) == []
    assert [n for n, _ in selected(compose(["addons=[slim]", "logger=none"]))] == ["slim"]


@pytest.mark.parametrize("defense_name", ["pgd_at", "trades", "mart"])
def test_active_slim_changes_the_attack_but_not_the_global_rng(defense_name: str) -> None:
    x, y = _data()
    model_a, model_b = _model(), _model()
    slim = _slim(model_a, fixed_lambda=1.0, fixed_loss="mse")
    step_a = TrainStep(model_a, _defense(defense_name), _sgd(model_a), [slim])
    step_b = TrainStep(model_b, _defense(defense_name), _sgd(model_b))
    torch.manual_seed(5)
    xa = step_a.craft(x, y)
    rng_a = torch.get_rng_state()
    torch.manual_seed(5)
    xb = step_b.craft(x, y)
    assert torch.equal(rng_a, torch.get_rng_state())  # data order and attack starts are not shifted
    assert not torch.equal(xa, xb)


# --------------------------------------------------------------------------- docs/methods/slim.md#tests outer
# loss untouched
@pytest.mark.parametrize("defense_name", ["pgd_at", "trades", "mart"])
def test_outer_loss_is_the_hosts_on_the_slim_batch(defense_name: str) -> None:
    x, y = _data()
    model, ref = _model(), _model()
    step = TrainStep(model, _defense(defense_name), _sgd(model), [_slim(model, fixed_lambda=0.8)])
    crafted: list[torch.Tensor] = []
    craft = step.craft

    def craft_and_snapshot(xx, yy):
        crafted.append(craft(xx, yy))
        ref.load_state_dict(model.state_dict())  # BN statistics as the attack left them (train-mode BN)
        return crafted[-1]

    step.craft = craft_and_snapshot
    metrics = step(x, y)
    # By hand: the host's outer loss alone on the x_adv SLIM crafted, one SGD step.
    ref.train()
    loss = _defense(defense_name).outer_loss(StepForwards(ref, x, y, crafted[0])).loss
    opt = _sgd(ref)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.equal(metrics["loss"], loss.detach())
    for (name, pa), pb in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14, msg=name)


# --------------------------------------------------------------------------- docs/methods/slim.md#tests
# gradient routing
@pytest.mark.parametrize("loss_name", LOSSES)
def test_dict_gradient_reaches_modules_up_to_the_layer_only(loss_name: str) -> None:
    x, _ = _data(2)
    model = _model().eval()
    loss = make_dict_loss(loss_name)
    with torch.no_grad():
        _, f_nat = forward_with_features(model, x, ["layer2"], detach=True)
    delta = THREAT.random_init(x, "uniform", torch.Generator().manual_seed(0)).requires_grad_(True)
    _, f_adv = forward_with_features(model, x + delta, ["layer2"])
    term = (-0.7 * loss(f_nat["layer2"], f_adv["layer2"])).sum()
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(term, [*params, delta], allow_unused=True)
    by_name = dict(zip(names, grads[:-1]))
    after = [n for n in names if n.startswith(("layer3", "layer4", "fc"))]
    upto = [n for n in names if n.startswith(("conv1", "bn1", "layer1", "layer2"))]
    assert after and all(by_name[n] is None for n in after)
    assert all(by_name[n] is not None and by_name[n].abs().sum() > 0 for n in upto if n.endswith("weight"))
    assert grads[-1].abs().sum() > 0  # after the random start the input gradient is non-zero
    # At x_adv = x every dictionary term is stationary: the reason a random start is required.
    x0 = x.clone().requires_grad_(True)
    _, f0 = forward_with_features(model, x0, ["layer2"])
    (g0,) = torch.autograd.grad(loss(f_nat["layer2"], f0["layer2"]).sum(), x0)
    assert g0.abs().max() < 1e-8


def test_attack_leaves_parameter_gradients_and_flags_untouched() -> None:
    x, y = _data()
    model = _model()
    model.layer1[0].conv1.weight.requires_grad_(False)  # a frozen parameter stays frozen
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    step = TrainStep(model, _defense("trades"), _sgd(model), [_slim(model, fixed_lambda=1.0)])
    step.craft(x, y)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]) and p.requires_grad == flags[n], n


# --------------------------------------------------------------------------- docs/methods/slim.md#tests
# constraint
def test_every_step_stays_in_the_ball_and_box_for_every_layer_and_loss() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64)
    x[0, 0] = 0.0  # pixels on the box boundary
    x[1, 1] = 1.0
    y = torch.tensor([1, 2])
    model = _model()
    for layer in candidate_layers(model):
        for loss in LOSSES:
            for lam in (1.0, -1.0):
                slim = _slim(model, fixed_layer=layer, fixed_loss=loss, fixed_lambda=lam)
                calls: list = []
                _spy(slim, calls)
                x_adv = TrainStep(model, _defense("pgd_at"), _sgd(model), [slim]).craft(x, y)
                assert len(calls) == STEPS
                for xa in [c["x_adv"] for c in calls] + [x_adv]:
                    assert (xa - x).abs().max() <= EPS + 1e-6, (layer, loss, lam)
                    assert xa.min() >= 0 and xa.max() <= 1


# --------------------------------------------------------------------------- docs/methods/slim.md#tests
# sampling
def test_draws_are_uniform() -> None:
    slim = _slim(_model())
    draws = [slim.draw() for _ in range(10_000)]
    lams = torch.tensor([d.lams[0] for d in draws])
    assert lams.min() > -1 and lams.max() < 1 and abs(float(lams.mean())) < 0.03
    assert stats.kstest(lams.numpy(), "uniform", args=(-1, 2)).pvalue > 1e-3
    for values, choices in (
        ([d.layers[0] for d in draws], slim.layers),
        ([d.losses[0] for d in draws], LOSSES),
    ):
        counts = [values.count(c) for c in choices]
        assert sum(counts) == 10_000 and stats.chisquare(counts).pvalue > 1e-3
    assert slim.draws == 10_000


def _draws_per_call(resample: str, calls: int = 2) -> list[list[tuple]]:
    x, y = _data(3)
    model = _model()
    slim = _slim(model, resample=resample)
    step = TrainStep(model, _defense("mart"), _sgd(model), [slim])
    out = []
    for _ in range(calls):
        record: list = []
        _spy(slim, record)
        step.craft(x, y)
        slim.inner_objective = SLIM.inner_objective.__get__(slim)
        out.append([r["draw"] for r in record])
    return out


def test_batch_mode_draws_once_per_attack_call() -> None:
    first, second = _draws_per_call("batch")
    assert len(first) == STEPS and len(set(first)) == 1 and len(set(second)) == 1
    assert first[0] != second[0]
    assert len(first[0][0]) == 1  # one (layer, loss, lambda) shared by the batch


def test_step_mode_redraws_every_step() -> None:
    (draws,) = _draws_per_call("step", calls=1)
    assert len(draws) == STEPS and len({d[2] for d in draws}) == STEPS


def test_sample_mode_draws_per_example_once_per_call() -> None:
    first, second = _draws_per_call("sample")
    assert len(set(first)) == 1 and first[0] != second[0]
    layers, losses, lams = first[0]
    assert len(layers) == len(losses) == len(lams) == 3 and len(set(lams)) == 3


def test_sample_mode_objective_is_per_example_term() -> None:
    x, y = _data(3)
    model = _model().eval()
    slim = _slim(model, resample="sample")
    step = TrainStep(model, _defense("pgd_at", bn_mode="eval"), _sgd(model), [slim])
    delta = THREAT.random_init(x, "uniform", torch.Generator().manual_seed(1))
    with attack_mode(model, "eval"), slim.attack_context(model, x, y):
        total = step.objective(x, y)(model, x + delta)
        d = slim.last_draw
    _, f_nat = forward_with_features(model, x, slim.layers)
    _, f_adv = forward_with_features(model, x + delta, slim.layers)
    expect = F.cross_entropy(model(x + delta), y, reduction="none")
    for i in range(3):
        term = make_dict_loss(d.losses[i])(f_nat[d.layers[i]][i : i + 1], f_adv[d.layers[i]][i : i + 1])
        expect[i] = expect[i] + d.lams[i] * term[0]
    torch.testing.assert_close(total.detach(), expect.detach())


# --------------------------------------------------------------------------- docs/methods/slim.md#tests
# determinism
def test_same_seed_same_draws_adversarials_and_weights() -> None:
    x, y = _data()
    seqs = []
    for seed in (0, 0, 1):
        slim = _slim(_model(), seed=seed)
        seqs.append([(d.layers[0], d.losses[0], d.lams[0]) for d in (slim.draw() for _ in range(20))])
    assert seqs[0] == seqs[1] and seqs[0] != seqs[2]
    runs = []
    for _ in range(2):
        model = _model()
        slim = _slim(model, seed=7)
        step = TrainStep(model, _defense("trades"), _sgd(model), [slim])
        torch.manual_seed(3)
        x_adv = step.craft(x, y)
        for _ in range(2):
            step(x, y)
        runs.append((x_adv, [p.detach().clone() for p in model.parameters()]))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


# --------------------------------------------------------------------------- docs/methods/slim.md#tests state
# hygiene
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_hooks_remain_and_mode_is_restored(mode: str) -> None:
    x, y = _data()
    model = _model()
    bare = copy.deepcopy(model)
    model.train(mode == "train")
    slim = _slim(model, resample="step")
    TrainStep(model, _defense("pgd_at", bn_mode="eval"), _sgd(model), [slim]).craft(x, y)
    assert all(not m._forward_hooks for m in model.modules())
    assert all(m.training == (mode == "train") for m in model.modules())
    evaluated = slim.wrap_for_eval(model).eval()
    assert evaluated is model
    assert torch.equal(evaluated(x), bare.eval()(x))


# --------------------------------------------------------------------------- docs/methods/slim.md#tests batch
# independence
@pytest.mark.parametrize("loss_name", LOSSES)
def test_attacking_a_batch_equals_attacking_each_example(loss_name: str) -> None:
    x, y = _data(3)
    model = _model()
    delta0 = THREAT.random_init(x, "normal", torch.Generator().manual_seed(2))

    def attack(idx: slice) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = x[idx], y[idx]
        slim = _slim(model, fixed_layer="layer2", fixed_loss=loss_name, fixed_lambda=-0.6)
        objective = TrainStep(model, _defense("trades"), _sgd(model), [slim]).objective(xs, ys)
        delta, first = delta0[idx].clone(), None
        with attack_mode(model, "eval"), slim.attack_context(model, xs, ys):
            for _ in range(STEPS):
                delta.requires_grad_(True)
                loss = objective(model, xs + delta)
                first = loss.detach() if first is None else first
                (grad,) = torch.autograd.grad(loss.sum(), delta)
                delta = THREAT.step(delta.detach(), grad, ALPHA, xs)
        return first, xs + delta

    loss_b, adv_b = attack(slice(None))
    singles = [attack(slice(i, i + 1)) for i in range(3)]
    torch.testing.assert_close(loss_b, torch.cat([s[0] for s in singles]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adv_b, torch.cat([s[1] for s in singles]), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- docs/methods/slim.md#tests host
# loss routing
@pytest.mark.parametrize("defense_name", ["pgd_at", "trades", "mart"])
def test_task_term_is_the_hosts_inner_loss(defense_name: str) -> None:
    x, y = _data()
    model = _model()
    slim = _slim(model)
    record: list = []
    _spy(slim, record)
    TrainStep(model, _defense(defense_name), _sgd(model), [slim]).craft(x, y)
    assert len(record) == STEPS
    for r in record:
        ce = F.cross_entropy(r["logits"], y, reduction="none")
        kl = kl_clean_adv(r["logits"], r["clean"])
        expected, other = (kl, ce) if defense_name == "trades" else (ce, kl)
        torch.testing.assert_close(r["base"], expected)
        assert not torch.allclose(r["base"], other)


def test_pgd_cs_config_is_a_pure_negative_cosine_feature_attack() -> None:
    x, y = _data()
    model, ref = _model(), _model()
    slim = _slim(model, task_weight=0.0, fixed_layer="layer4", fixed_loss="reverse", fixed_lambda=1.0)
    assert slim.required_layers() == ["layer4"]
    torch.manual_seed(8)
    x_adv = TrainStep(model, _defense("pgd_at", bn_mode="eval"), _sgd(model), [slim]).craft(x, y)
    # By hand: PGD from the same uniform start ascending -cos(f4(x), f4(x_adv)) only, BN in eval mode.
    ref.eval()
    with torch.no_grad():
        _, f_nat = forward_with_features(ref, x, ["layer4"])
    torch.manual_seed(8)
    delta = THREAT.random_init(x, "uniform")
    for _ in range(STEPS):
        delta.requires_grad_(True)
        _, f_adv = forward_with_features(ref, x + delta, ["layer4"])
        neg_cos = -F.cosine_similarity(f_nat["layer4"].flatten(1), f_adv["layer4"].flatten(1), dim=1)
        (grad,) = torch.autograd.grad(neg_cos.sum(), delta)
        delta = THREAT.step(delta.detach(), grad, ALPHA, x)
    torch.testing.assert_close(x_adv, (x + delta).clamp(0, 1), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- config and state
def test_check_config_messages_name_the_key_and_the_allowed_values() -> None:
    bad = OmegaConf.merge(
        DEFAULTS,
        {"task_weight": -1.0, "resample": "often", "lam_low": 2.0, "losses": ["mse", "l1"], "cos_mode": "x",
         "cos_eps": 0.0, "lamda": 1.0},
    )  # fmt: skip
    run = OmegaConf.create({"defense": {"attack": {"random_start": "none"}}})
    text = "\n".join(check_addon("slim", bad, run))
    assert "addons.slim.task_weight=-1.0 is out of range" in text and "0 <= value" in text
    assert "addons.slim.resample='often' is not allowed; choose one of: batch, step, sample" in text
    assert "addons.slim.lam_low=2 must be <= addons.slim.lam_high=1" in text
    assert "addons.slim.losses contains 'l1'; allowed: mse, ortho, reverse" in text
    assert "addons.slim.cos_mode='x'" in text and "addons.slim.cos_eps=0.0 is out of range" in text
    assert "addons.slim.lamda is not a known key" in text
    assert "defense.attack.random_start=none" in text
    assert check_addon("slim", DEFAULTS) == []


def test_run_config_validation_refuses_bad_values_and_standard(compose) -> None:
    with pytest.raises(ConfigError, match=r"addons\.slim\.granularity='layer'.*stage, block"):
        validate_train_config(compose(["addons=[slim]", "addons.slim.granularity=layer", "logger=none"]))
    problems = check_addons(compose(["addons=[slim]", "defense=standard", "logger=none"]))
    assert any("does not compose with defense=standard" in p for p in problems)
    validate_train_config(compose(["addons=[slim]", "defense=trades_awp", "logger=none"]))


def test_state_dict_round_trip_continues_the_draw_sequence() -> None:
    model = _model()
    slim = _slim(model, seed=3)
    for _ in range(3):
        slim.draw()
    state = copy.deepcopy(slim.state_dict())
    expected = [slim.draw().lams[0] for _ in range(5)]
    other = _slim(model, seed=99)
    other.load_state_dict(state)
    assert other.draws == 3
    assert [other.draw().lams[0] for _ in range(5)] == expected


# --------------------------------------------------------------------------- presets and runs
SLIM_PRESETS = sorted(p.stem for p in (CONF / "experiment" / "slim").glob("*.yaml"))


def test_paper_presets_compose_with_the_papers_settings(compose) -> None:
    assert len(SLIM_PRESETS) == 7
    for name in SLIM_PRESETS:
        cfg = compose([f"experiment=slim/{name}", "logger=none"])
        validate_train_config(cfg)
        assert cfg.model.name == "resnet18" and cfg.trainer.batch_size == 64 and not cfg.dataset.flip
        assert cfg.dataset.crop_pad == 0 and cfg.defense.attack.bn_mode == "eval"
        assert cfg.paper.results and cfg.paper.verified is False
        on = [n for n, _ in selected(cfg)]
        assert on == ([] if name in ("table4_pgd_at", "table4_trades", "table4_mart") else ["slim"]), name
    cfg = compose(["experiment=slim/table4_pgd_at_slim", "logger=none"])
    assert cfg.paper.results.table4.pgd20 == 51.46 and cfg.defense.attack.step == "1/255"
    cs = compose(["experiment=slim/table1_pgd_cs_at", "logger=none"]).addons.slim
    assert (cs.task_weight, cs.fixed_layer, cs.fixed_loss, cs.fixed_lambda) == (0.0, "layer4", "reverse", 1.0)


E2E = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval=quick", "eval.n_examples=16",
    "eval.checkpoints=[last]", "dataset.train_limit=64", "trainer.batch_size=32", "addons=[slim]",
]  # fmt: skip


@pytest.mark.parametrize("defense_name", ["pgd_at", "trades", "mart", "awp"])
def test_end_to_end_run_and_evaluation_never_invokes_slim(
    compose, tmp_path, monkeypatch, defense_name
) -> None:
    """docs/methods/slim.md#tests two epochs train with finite losses; SLIM runs in every training attack and
    nowhere else."""
    import robust_train.commands.train as run_module

    calls = {"attack": 0, "inner": 0}
    in_eval = {"on": False}
    real_ctx, real_inner = SLIM.attack_context, SLIM.inner_objective

    def ctx(self, model, x, y):
        assert not in_eval["on"]
        calls["attack"] += 1
        return real_ctx(self, model, x, y)

    def inner(self, *args):
        assert not in_eval["on"]
        calls["inner"] += 1
        return real_inner(self, *args)

    # The training run's one evaluation path (suite and sanity checks of every checkpoint).
    real_evaluate = run_module.evaluate_model

    def evaluate(*args, **kwargs):
        in_eval["on"] = True
        try:
            return real_evaluate(*args, **kwargs)
        finally:
            in_eval["on"] = False

    monkeypatch.setattr(SLIM, "attack_context", ctx)
    monkeypatch.setattr(SLIM, "inner_objective", inner)
    monkeypatch.setattr(run_module, "evaluate_model", evaluate)
    # Beyond the standard smoke overrides: two epochs (docs/methods/slim.md#tests); fewer attack steps and
    # validation
    # examples keep it fast.
    cfg = compose(
        [*E2E, f"defense={defense_name}", "trainer.epochs=2", "defense.attack.steps=2",
         "trainer.validation.max_examples=16"]
    )  # fmt: skip
    results = run_module.train_run(cfg, tmp_path / "run")
    attacks = results["eval"]["last"]["attacks"]
    assert 0 <= attacks["clean"]["accuracy"] <= 100 and 0 <= attacks["pgd20"]["accuracy"] <= 100
    history = results["train"]["history"]
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history)
    # 64 images, batch 32, 2 epochs: 4 training attacks of 2 steps; validation and evaluation add none.
    assert calls == {"attack": 4, "inner": 8}
