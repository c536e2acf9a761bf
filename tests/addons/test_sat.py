"""SAT add-on (docs/methods/sat.md#tests): docs/methods/sat.md#tests, reductions to every host, config and
end-to-end runs."""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn

from robust_train.addons import check_addons
from robust_train.addons.base import AddonContext
from robust_train.addons.sat import (
    SAT,
    CodeGaussianStart,
    SATConfig,
    cluster_loss,
    default_taps,
    feature_shift,
)
from robust_train.addons.sat_metrics import class_centroids, clustering_accuracy, clustering_accuracy_report
from robust_train.attacks import ThreatModel
from robust_train.builders import model_from_config
from robust_train.commands.train import train_run
from robust_train.config import validate_train_config
from robust_train.defenses import build_defense
from robust_train.errors import ConfigError
from robust_train.models import build_model, capture_features, forward_with_features
from robust_train.schema import plain
from robust_train.training.step import TrainStep

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 3
CONF = Path(__file__).resolve().parents[2] / "robust_train" / "conf"
HOSTS = {"pgd_at": "uniform", "trades": "normal", "mart": "normal"}


def _model(name: str = "preact_resnet18") -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10, (0.5,) * 3, (0.25,) * 3, width=0.0625).double()


@pytest.fixture
def prn() -> nn.Module:
    return _model()


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 16, 16, generator=g, dtype=torch.float64)
    x[0] = 0.0  # the box boundary
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])  # a singleton class (2) and missing classes
    return x, y


def _defense(name: str, awp: bool = False, steps: int = STEPS):
    start = HOSTS[name]
    beta = {"beta": 6.0} if name in ("trades", "mart") else {}
    node = {"name": name, **beta, "awp": {"enabled": awp, "gamma": 0.01, "warmup_epochs": 0},
            "attack": {"name": "pgd", "steps": steps, "step": ALPHA, "restarts": 1, "random_start": start,
                       "bn_mode": "eval"}}  # fmt: skip
    return build_defense(OmegaConf.create(node), ThreatModel("linf", EPS))


def _sat(model: nn.Module, defense, seed: int = 0, **overrides) -> SAT:
    cfg = OmegaConf.merge(OmegaConf.create(plain(SATConfig())), overrides)
    ctx = AddonContext(
        cfg=None, model=model, defense=defense, threat=defense.threat, num_classes=10, seed=seed
    )
    return SAT(cfg, ctx)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


# ----------------------------------------------------------------------------------------------
# docs/methods/sat.md#tests
def test_lam_zero_attack_is_bit_identical_to_host_attack(prn, data) -> None:
    x, y = data
    for host in HOSTS:
        defense = _defense(host)
        sat = _sat(prn, defense, lam=0.0, beta=0.1)
        torch.manual_seed(7)
        with_sat = TrainStep(prn, defense, _sgd(prn), [sat]).craft(x, y)
        torch.manual_seed(7)
        without = TrainStep(prn, defense, _sgd(prn)).craft(x, y)
        assert torch.equal(with_sat, without), host
        assert sat.drawn == []
        # ... while a positive lambda changes the perturbation.
        torch.manual_seed(7)
        changed = TrainStep(prn, defense, _sgd(prn), [_sat(prn, defense, lam=1.0)]).craft(x, y)
        assert not torch.equal(changed, without), host


@pytest.mark.parametrize("host,awp", [("pgd_at", False), ("trades", False), ("mart", False),
                                      ("pgd_at", True), ("trades", True)])  # fmt: skip
def test_zero_strength_step_is_exactly_the_host_step(prn, data, host: str, awp: bool) -> None:
    x, y = data
    ref = copy.deepcopy(prn)
    d1, d2 = _defense(host, awp), _defense(host, awp)
    torch.manual_seed(11)
    m1 = TrainStep(prn, d1, _sgd(prn), [_sat(prn, d1, lam=0.0, beta=0.0)])(x, y)
    rng1 = torch.get_rng_state()
    torch.manual_seed(11)
    m2 = TrainStep(ref, d2, _sgd(ref))(x, y)
    assert torch.equal(rng1, torch.get_rng_state())
    assert torch.equal(m1["loss"], m2["loss"])
    assert not any(k.startswith("sat/") for k in m1)
    for (name, a), b in zip(prn.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), name


def test_sat_awp_removes_the_weight_perturbation_after_the_step(prn, data) -> None:
    x, y = data
    defense = _defense("pgd_at", awp=True)
    before = copy.deepcopy(prn.state_dict())
    frozen = torch.optim.SGD(prn.parameters(), lr=0.0)
    metrics = TrainStep(prn, defense, frozen, [_sat(prn, defense, lam=1.0, beta=1.0)])(x, y)
    assert torch.isfinite(metrics["loss"]) and metrics["sat/cluster"] > 0
    for name, p in prn.named_parameters():
        assert torch.equal(p, before[name]), name


def test_sat_pgd_step_loss_is_ce_plus_beta_cluster_of_train_mode_adv_features(prn, data) -> None:
    x, y = data
    beta = 0.5
    twin = copy.deepcopy(prn)
    d1, d2 = _defense("pgd_at"), _defense("pgd_at")
    sat1, sat2 = _sat(prn, d1, lam=0.5, beta=beta), _sat(twin, d2, lam=0.5, beta=beta)
    torch.manual_seed(5)
    metrics = TrainStep(prn, d1, _sgd(prn), [sat1])(x, y)
    torch.manual_seed(5)
    x_adv = TrainStep(twin, d2, _sgd(twin), [sat2]).craft(x, y)
    assert sat1.drawn == sat2.drawn and len(sat1.drawn) == STEPS
    twin.train()
    logits, feats = forward_with_features(twin, x_adv, sat2.layers)
    clu = cluster_loss([feats[n] for n in sat2.layers], y, 10)
    torch.testing.assert_close(metrics["sat/cluster"], beta * clu.detach())
    torch.testing.assert_close(metrics["loss"], (F.cross_entropy(logits, y) + beta * clu).detach())


# ----------------------------------------------------------------------------------------------
# docs/methods/sat.md#tests
def _hand_features() -> tuple[torch.Tensor, torch.Tensor]:
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, 3.0], [1.0, 5.0]], dtype=torch.float64)
    return f, torch.tensor([0, 0, 1, 1, 1])


def test_cluster_loss_hand_example() -> None:
    f, y = _hand_features()
    # Tolerance 1e-5: the eps-safe roots move the value by about 1e-6 (docs/methods/sat.md#cluster-loss).
    assert abs(float(cluster_loss([f], y, 3, "code")) - 3.2) < 1e-5
    paper = cluster_loss([f], y, 3, "paper")
    assert abs(float(paper) - (1 + (8 / 3) ** 0.5) / 2) < 1e-5 and abs(float(paper) - 1.316497) < 1e-5
    assert abs(float(cluster_loss([f], y, 3, "l2dist")) - 1.166667) < 1e-5
    # Two taps: the mean over taps.
    two = cluster_loss([f, 2 * f], y, 3, "code")
    assert abs(float(two) - (3.2 + 4 * 3.2) / 2) < 1e-5


@pytest.mark.parametrize("form", ["code", "paper", "l2dist"])
def test_cluster_loss_invariances(form: str) -> None:
    f, y = _hand_features()
    shifted = f.clone()
    shifted[y == 1] += torch.tensor([3.5, -7.25], dtype=torch.float64)
    torch.testing.assert_close(cluster_loss([shifted], y, 3, form), cluster_loss([f], y, 3, form))
    coincide = torch.tensor([[0.5, 1.0]] * 2 + [[-2.0, 4.0]] * 3, dtype=torch.float64)
    assert float(cluster_loss([coincide], y, 3, form)) == 0.0
    # A singleton class (label 2) is ignored: no NaN, no contribution, no gradient.
    extra = torch.cat([f, torch.tensor([[100.0, -50.0]], dtype=torch.float64)]).requires_grad_(True)
    loss = cluster_loss([extra], torch.tensor([0, 0, 1, 1, 1, 2]), 3, form)
    torch.testing.assert_close(loss, cluster_loss([f], y, 3, form))
    (g,) = torch.autograd.grad(loss, extra)
    assert torch.isfinite(g).all() and torch.equal(g[5], torch.zeros(2, dtype=torch.float64))
    # Only singletons: zero, finite.
    assert float(cluster_loss([f[:3]], torch.tensor([0, 1, 2]), 3, form)) == 0.0


def test_finite_gradients_at_zero_shift_and_zero_variance_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(0)
    feats = torch.rand(6, 3, 2, 2, generator=g, dtype=torch.float64)
    ref = feats.clone()
    for reduction in ("batch_frobenius", "per_sample"):
        at_ref = feats.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(feature_shift([at_ref], [ref], reduction).sum(), at_ref)
        assert torch.isfinite(grad).all()
    dead = torch.relu(torch.randn(6, 5, generator=g, dtype=torch.float64))
    dead[:, 2] = 0.0  # a dead unit: zero variance in every class
    dead.requires_grad_(True)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    for form in ("code", "paper", "l2dist"):
        (grad,) = torch.autograd.grad(cluster_loss([dead], y, 2, form), dead)
        assert torch.isfinite(grad).all(), form
    away = (feats + 0.1 * torch.rand(feats.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    for reduction in ("batch_frobenius", "per_sample"):
        assert torch.autograd.gradcheck(lambda t, r=reduction: feature_shift([t], [ref], r), (away,))
    spread = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    for form in ("code", "paper", "l2dist"):
        assert torch.autograd.gradcheck(lambda t, fm=form: cluster_loss([t], y, 2, fm), (spread,))


def test_batch_frobenius_objective_is_b_times_code_objective(prn, data) -> None:
    x, y = data
    defense = _defense("pgd_at")
    sat = _sat(prn, defense, lam=0.3)
    sat._uniform = lambda n: 0.5  # Λ = 0.15
    step = TrainStep(prn, defense, _sgd(prn), [sat])
    x_adv = (x + 0.01).clamp(0, 1)
    prn.eval()
    total = step.objective(x, y)(prn, x_adv).sum()
    logits, fa = forward_with_features(prn, x_adv, sat.layers)
    _, fc = forward_with_features(prn, x, sat.layers)
    frob = sum(torch.linalg.norm((fa[n] - fc[n]).flatten(1)) for n in sat.layers) / len(sat.layers)
    expected = len(y) * (F.cross_entropy(logits, y) - 0.15 * frob)
    torch.testing.assert_close(total, expected)
    # per_sample: the seed's Eq. 9 form, per-row L2 norms averaged over taps.
    sat2 = _sat(prn, defense, lam=0.3, shift_reduction="per_sample")
    sat2._uniform = lambda n: 0.5
    term = TrainStep(prn, defense, _sgd(prn), [sat2]).objective(x, y)(prn, x_adv) - F.cross_entropy(
        logits, y, reduction="none"
    )
    rows = sum((fa[n] - fc[n]).flatten(1).norm(dim=1) for n in sat.layers) / len(sat.layers)
    # atol: the eps-safe root shifts each norm by about 1e-6.
    torch.testing.assert_close(term, -0.15 * rows, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# docs/methods/sat.md#tests
@pytest.mark.parametrize("host", ["pgd_at", "trades"])
def test_adversarial_batch_stays_in_ball_and_box(prn, data, host: str) -> None:
    x, y = data
    defense = _defense(host)
    for lam in (0.087, 100.0):
        x_adv = TrainStep(prn, defense, _sgd(prn), [_sat(prn, defense, lam=lam)]).craft(x, y)
        assert float((x_adv - x).abs().max()) <= EPS + 1e-7
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_lambda_sampling(prn, data) -> None:
    x, y = data
    defense = _defense("pgd_at")
    lam = 0.4
    sat = _sat(prn, defense, lam=lam)
    TrainStep(prn, defense, _sgd(prn), [sat]).craft(x, y)
    assert len(sat.drawn) == STEPS and len(set(sat.drawn)) == STEPS
    assert all(0.0 <= v <= lam for v in sat.drawn)
    # Mocked RNG: the k-th attack step uses exactly lam * u_k.
    mocked = _sat(prn, defense, lam=lam)
    us = iter([0.25, 0.5, 1.0])
    mocked._uniform = lambda n: next(us)
    TrainStep(prn, defense, _sgd(prn), [mocked]).craft(x, y)
    assert mocked.drawn == [0.1, 0.2, 0.4]
    # Fixed modes draw once per batch; per_sample_fixed draws one value per sample.
    fixed = _sat(prn, defense, lam=lam, lam_sampling="per_batch_fixed")
    step = TrainStep(prn, defense, _sgd(prn), [fixed])
    step.craft(x, y)
    first = list(fixed.drawn)
    step.craft(x, y)
    assert len(first) == 1 and len(fixed.drawn) == 1 and fixed.drawn != first
    per_sample = _sat(prn, defense, lam=lam, lam_sampling="per_sample_fixed", shift_reduction="per_sample")
    TrainStep(prn, defense, _sgd(prn), [per_sample]).craft(x, y)
    (values,) = per_sample.drawn
    assert values.shape == (len(y),) and bool(((values >= 0) & (values <= lam)).all())
    # lambda = 0: no term, no draw.
    zero = _sat(prn, defense, lam=0.0)
    TrainStep(prn, defense, _sgd(prn), [zero]).craft(x, y)
    assert zero.drawn == []


def test_penalty_direction_large_lambda_shrinks_the_feature_shift(prn, data) -> None:
    x, y = data
    defense = _defense("pgd_at", steps=5)
    stats = {}
    for lam in (0.0, 100.0):
        sat = _sat(prn, defense, lam=lam)
        torch.manual_seed(3)
        x_adv = TrainStep(prn, defense, _sgd(prn), [sat]).craft(x, y)
        prn.eval()
        with torch.no_grad():
            logits, fa = forward_with_features(prn, x_adv, sat.layers)
            _, fc = forward_with_features(prn, x, sat.layers)
        shift = feature_shift([fa[n] for n in sat.layers], [fc[n] for n in sat.layers], "per_sample")
        stats[lam] = (float(shift.mean()), float(F.cross_entropy(logits, y)))
    assert stats[100.0][0] < stats[0.0][0]
    assert stats[100.0][1] <= stats[0.0][1]


def test_sat_trades_does_not_collapse_to_the_start(prn, data) -> None:
    x, y = data
    defense = _defense("trades", steps=10)
    torch.manual_seed(0)
    x_adv = TrainStep(prn, defense, _sgd(prn), [_sat(prn, defense)]).craft(x, y)
    r_inf = (x_adv - x).abs().flatten(1).max(dim=1).values
    assert float(r_inf.mean()) > EPS / 2


# ----------------------------------------------------------------------------------------------
# docs/methods/sat.md#attack-start
def test_code_gaussian_start_distribution_shape_and_clipping() -> None:
    threat = CodeGaussianStart("linf", EPS)
    x = torch.full((64, 3, 16, 16), 0.5, dtype=torch.float64)
    x[:, :, 0] = 0.0  # box boundaries: the start is clipped to [0, 1] there
    x[:, :, 1] = 1.0
    delta = threat.random_init(x, "none", torch.Generator().manual_seed(0))  # the host's kind is ignored
    assert delta.shape == x.shape and delta.dtype == x.dtype
    # Exactly the code's x + eps * (2 * N(0, 1) - 1), clipped to [0, 1] only.
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(x + delta, (x + EPS * (2 * noise - 1)).clamp(0, 1))
    inner = delta[:, :, 2:].flatten()
    # Gaussian with mean -eps and std 2 eps (not U(-eps, eps), not projected onto the ball) ...
    assert abs(float(inner.mean()) / EPS + 1) < 0.02
    assert abs(float(inner.std()) / EPS - 2) < 0.02
    # ... so P(|delta| > eps) = P(N < 0) + P(N > 1) = 0.5 + 0.1587 and P(delta < -eps) = 0.5.
    outside = float((inner.abs() > EPS).double().mean())
    assert abs(outside - (0.5 + 0.5 * math.erfc(1 / math.sqrt(2)))) < 0.01
    assert abs(float((inner < -EPS).double().mean()) - 0.5) < 0.01
    assert float(inner.abs().max()) > 3 * EPS
    # At the box boundaries only the inward part survives.
    assert float(delta[:, :, 0].min()) == 0.0 and float(delta[:, :, 1].max()) == 0.0
    assert float((x + delta).min()) >= 0.0 and float((x + delta).max()) <= 1.0


def test_code_gaussian_init_is_the_attacks_first_point_and_the_step_projects_it(prn, data) -> None:
    x, y = data
    defense = _defense("pgd_at")
    host_threat = defense.attack.threat
    sat = _sat(prn, defense, init="code_gaussian")
    points: list[torch.Tensor] = []

    def objective(model: nn.Module, x_in: torch.Tensor) -> torch.Tensor:
        points.append(x_in.detach().clone())
        return F.cross_entropy(model(x_in), y, reduction="none")

    prn.eval()
    torch.manual_seed(7)
    noise = torch.randn(x.shape, dtype=x.dtype)
    torch.manual_seed(7)
    with sat.attack_context(prn, x, y):
        assert isinstance(defense.attack.threat, CodeGaussianStart)
        assert defense.attack.threat.eps == host_threat.eps
        x_adv = defense.attack(prn, x, y, objective)
    assert defense.attack.threat is host_threat  # restored after the batch
    start = points[0]
    torch.testing.assert_close(start, (x + EPS * (2 * noise - 1)).clamp(0, 1), rtol=0, atol=1e-15)
    assert float((start - x).abs().max()) > EPS  # the start is outside the ball ...
    for later in [*points[1:], x_adv]:  # ... every later point is inside it and the box
        assert float((later - x).abs().max()) <= EPS + 1e-7
        assert float(later.min()) >= 0.0 and float(later.max()) <= 1.0
    # The host start (default) is unchanged, and code_gaussian changes the attack in a full SAT step.
    assert _sat(prn, defense).init == "host"
    torch.manual_seed(7)
    host = TrainStep(prn, defense, _sgd(prn), [_sat(prn, defense)]).craft(x, y)
    torch.manual_seed(7)
    code = TrainStep(prn, defense, _sgd(prn), [_sat(prn, defense, init="code_gaussian")]).craft(x, y)
    assert not torch.equal(host, code)
    assert float((code - x).abs().max()) <= EPS + 1e-7


def test_code_gaussian_init_config_checks(compose) -> None:
    base = ["addons=[sat]", "logger=none", "addons.sat.init=code_gaussian"]
    assert check_addons(compose(base)) == []
    l2 = check_addons(compose([*base, "threat.norm=l2", "threat.eps=0.5", "threat.step=0.1"]))
    assert any("addons.sat.init=code_gaussian is the authors' L-inf start" in p for p in l2)
    zero = check_addons(compose([*base, "defense.attack.steps=0"]))
    assert any("needs defense.attack.steps >= 1" in p for p in zero)
    # A config saved before the key existed means the host's start.
    cfg = compose(["addons=[sat]", "logger=none", "~addons.sat.init"])
    assert "init" not in cfg.addons.sat and check_addons(cfg) == []


SAT_PRESETS = sorted((CONF / "experiment" / "sat").glob("*.yaml"))


@pytest.mark.parametrize("path", SAT_PRESETS, ids=lambda p: p.stem)
def test_presets_use_the_authors_stem_and_start(path: Path) -> None:
    preset = yaml.safe_load(path.read_text())
    overrides = {k: v for d in preset["defaults"] if isinstance(d, dict) for k, v in d.items()}
    model, defense = overrides["override /model"], overrides["override /defense"]
    # ResNet-18: the authors' 7x7 stride-2 stem (2048-d taps, the size lambda/beta were tuned on).
    assert preset["model"].get("stem") == ("conv7x7_s2" if model == "resnet18" else None)
    # The authors' SAT attack starts from their Gaussian; SAT-TRADES keeps TRADES' start
    # (docs/methods/sat.md#composition).
    init = preset["addons"]["sat"].get("init", "host")
    assert init == ("host" if defense == "trades" else "code_gaussian")
    assert preset["defense"]["attack"]["steps"] >= 1 and preset["threat"]["norm"] == "linf"


def test_resnet18_preset_taps_are_2048_dim_at_full_width(compose) -> None:
    cfg = compose(["experiment=sat/sat_resnet18", "logger=none"])
    torch.manual_seed(0)
    model = model_from_config(cfg.model, num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    taps = default_taps(model)
    assert taps == ["layer4.0", "layer4.1"]
    with torch.no_grad():
        _, feats = forward_with_features(model, torch.rand(2, 3, 32, 32), taps)
    assert [feats[n].flatten(1).shape[1] for n in taps] == [2048, 2048]  # 512 channels x 2 x 2


# ----------------------------------------------------------------------------------------------
# docs/methods/sat.md#tests
def test_taps_auto_exist_match_manual_recomputation_and_are_removed(prn, data) -> None:
    x, y = data
    assert default_taps(prn) == ["layer4.0", "layer4.1"]
    assert default_taps(_model("resnet18")) == ["layer4.0", "layer4.1"]
    wrn28, wrn34 = _model("wrn28_10"), _model("wrn34_10")
    assert default_taps(wrn28) == ["block3.layer.2", "block3.layer.3"]
    assert default_taps(wrn34) == ["block3.layer.3", "block3.layer.4"]
    defense = _defense("pgd_at")
    with pytest.raises(ConfigError, match=r"'layer4\.0'.*known layers: block1\.layer\.0"):
        _sat(wrn28, defense, layers=["layer4.0"])
    with pytest.raises(ConfigError, match="layers=auto"):
        _sat(nn.Sequential(nn.Flatten(), nn.Linear(3, 10)), defense)
    # The captured output equals the stage recomputed by hand.
    prn.eval()
    with torch.no_grad(), capture_features(prn, ["layer4.0", "layer4.1"]) as feats:
        prn(x)
        h = prn.conv1(prn.normalize(x))
        for stage in (prn.layer1, prn.layer2, prn.layer3):
            h = stage(h)
        first = prn.layer4[0](h)
        second = prn.layer4[1](first)
    assert torch.equal(feats["layer4.0"], first) and torch.equal(feats["layer4.1"], second)
    # No hook survives a SAT step.
    TrainStep(prn, defense, _sgd(prn), [_sat(prn, defense)])(x, y)
    assert all(not m._forward_hooks for m in prn.modules())


# ----------------------------------------------------------------------------------------------
# docs/methods/sat.md#tests
def test_clustering_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    centers = 10.0 * torch.eye(4, dtype=torch.float64)
    y_train = torch.arange(4).repeat(5)
    train = centers[y_train] + 0.1 * torch.randn(20, 4, generator=g, dtype=torch.float64)
    y_test = torch.arange(4).repeat(3)
    test = centers[y_test] + 0.1 * torch.randn(12, 4, generator=g, dtype=torch.float64)
    cents = class_centroids(train, y_train, 4)
    assert clustering_accuracy(test, y_test, cents) == 1.0
    assert clustering_accuracy(cents[(y_test + 1) % 4], y_test, cents) == 0.0
    # Through a model: test images of class c sit on the *training* centroid of class c+1, so centroids
    # taken from the test images would score 1.0 and training centroids score 0.0.
    model = nn.Sequential()
    model.add_module("feat", nn.Identity())
    model.add_module("head", nn.Linear(4, 4).double())
    moved = cents[(y_test + 1) % 4] + 0.1 * torch.randn(12, 4, generator=g, dtype=torch.float64)
    assert class_centroids(moved, y_test, 4).sub(cents).abs().max() > 5
    report = clustering_accuracy_report(model, ["feat"], (train, y_train), (moved, y_test), 4)
    assert report["feat"] == 0.0
    report = clustering_accuracy_report(model, ["feat"], (train, y_train), (test, y_test), 4, batch_size=5)
    assert report["feat"] == 1.0
    assert report["classifier"] == float((model(test).argmax(1) == y_test).double().mean())
    # Adversarial test images: an "attack" that moves each image onto the next class's centroid.
    report = clustering_accuracy_report(
        model, ["feat"], (train, y_train), (test, y_test), 4, attack=lambda m, xb, yb: cents[(yb + 1) % 4]
    )
    assert report["feat"] == 0.0


# ----------------------------------------------------------------------------------------------
# docs/methods/sat.md#tests
def test_cluster_term_decreases_when_training_a_fixed_batch(prn, data) -> None:
    x, y = data
    defense = _defense("pgd_at", steps=1)
    step = TrainStep(
        prn, defense, torch.optim.SGD(prn.parameters(), lr=0.01), [_sat(prn, defense, beta=10.0)]
    )
    values = [step(x, y)["sat/cluster"] for _ in range(20)]
    assert all(torch.isfinite(v) for v in values)
    assert float(values[-1]) < float(values[0])


def test_state_dict_round_trip_reproduces_the_lambda_stream(prn, data) -> None:
    x, y = data
    defense = _defense("pgd_at")
    sat = _sat(prn, defense, lam=1.0)
    step = TrainStep(prn, defense, _sgd(prn), [sat])
    step.craft(x, y)
    buf = io.BytesIO()
    torch.save(sat.state_dict(), buf)
    step.craft(x, y)
    expected = list(sat.drawn)
    fresh = _sat(prn, defense, lam=1.0, seed=99)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    TrainStep(prn, defense, _sgd(prn), [fresh]).craft(x, y)
    assert fresh.drawn == expected
    # Own generator: the stream depends on the run seed, not on the global RNG.
    a, b = _sat(prn, defense, lam=1.0, seed=1), _sat(prn, defense, lam=1.0, seed=1)
    torch.manual_seed(0)
    TrainStep(prn, defense, _sgd(prn), [a]).craft(x, y)
    torch.manual_seed(1)
    TrainStep(prn, defense, _sgd(prn), [b]).craft(x, y)
    assert a.drawn == b.drawn


def test_bad_configs_are_refused_with_the_key(compose) -> None:
    cases = {
        "addons.sat.lam=-1": "addons.sat.lam=-1 is out of range: allowed 0 <= value",
        "addons.sat.beta=-0.5": "addons.sat.beta=-0.5 is out of range",
        "addons.sat.cluster_form=median": "addons.sat.cluster_form='median' is not allowed; choose one of",
        "addons.sat.lam_sampling=per_epoch": "addons.sat.lam_sampling='per_epoch' is not allowed",
        "addons.sat.min_class_count=1": "addons.sat.min_class_count=1 is out of range",
        "addons.sat.layers=[]": "addons.sat.layers=[] is not allowed",
        "addons.sat.lam_sampling=per_sample_fixed": "needs addons.sat.shift_reduction=per_sample",
        "addons.sat.awp_include_cluster=true": "awp_include_cluster=true is not supported",
        "+addons.sat.lamda=0.1": "addons.sat.lamda is not a known key",
        "addons.sat.init=uniform": "addons.sat.init='uniform' is not allowed; choose one of: host, code_",
        "defense=standard": "addons=[sat] does not compose with defense=standard",
    }
    for override, message in cases.items():
        cfg = compose(["addons=[sat]", "logger=none", override])
        assert any(message in p for p in check_addons(cfg)), override
    with pytest.raises(ConfigError, match=r"addons\.sat\.lam=-1"):
        validate_train_config(compose(["addons=[sat]", "logger=none", "addons.sat.lam=-1"]))


def test_hydra_composes_sat_with_trades_and_awp(compose) -> None:
    for defense in ("trades", "awp", "mart", "trades_awp"):
        cfg = compose(["addons=[sat]", "logger=none", f"defense={defense}"])
        validate_train_config(cfg)
        assert cfg.addons.sat.lam == 0.087 and cfg.addons.sat.beta == 0.1


E2E = ["debug=fast", "logger=none", "trainer.progress=false", "eval=quick", "eval.n_examples=16",
       "eval.checkpoints=[last]", "dataset.train_limit=64", "trainer.batch_size=32",
       "addons=[sat]"]  # fmt: skip


@pytest.mark.parametrize("defense,extra", [
    ("pgd_at", ["trainer.epochs=2"]),
    ("trades", ["defense.attack.steps=3"]),
    ("mart", ["defense.attack.steps=3"]),
    ("awp", ["defense.attack.steps=3"]),
])  # fmt: skip
def test_end_to_end_run(compose, tmp_path, defense: str, extra: list[str]) -> None:
    cfg = compose([*E2E, f"defense={defense}", "trainer.validation.pgd_steps=1", *extra])
    results = train_run(cfg, tmp_path / "run")
    attacks = results["eval"]["last"]["attacks"]
    assert {"clean", "pgd20"} <= set(attacks)
    assert all(0.0 <= attacks[k]["accuracy"] <= 100.0 for k in ("clean", "pgd20"))
    history = results["train"]["history"]
    assert len(history) == int(cfg.trainer.epochs)
    assert all(torch.isfinite(torch.tensor(float(r["train/loss"]))) for r in history)
