"""SSA / SSAH (docs/methods/ssa.md, docs/methods/ssa.md#bounded-evaluation, docs/methods/ssa.md#tests)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from feature_attack_helpers import SmallNet, trained_small_net

import robust_train.attacks.ssa as ssa_module
from robust_train.attacks import PGD, SSAH, ThreatModel, build_attack
from robust_train.attacks.ssa import from_tanh_space, haar_low_pass, to_tanh_space
from robust_train.errors import ConfigError
from robust_train.evaluation import evaluate_accuracy

EPS = 0.1


@pytest.fixture(scope="module")
def trained() -> dict:
    return trained_small_net()


def _haar_analysis(n: int) -> torch.Tensor:
    """The (n/2 x n) low-pass analysis matrix of the orthonormal Haar filter [1/sqrt2, 1/sqrt2]."""
    a = torch.zeros(n // 2, n, dtype=torch.float64)
    for i in range(n // 2):
        a[i, 2 * i] = a[i, 2 * i + 1] = 2**-0.5
    return a


def test_haar_low_pass_equals_a_direct_dwt() -> None:
    x = torch.rand(2, 3, 8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows, cols = _haar_analysis(8), _haar_analysis(6)
    # LL band of the one-level 2D DWT: LL = A_r X A_c^T; with orthonormal filters each LL value is the
    # 2x2 block sum / 2 (a factor 1/sqrt2 per axis). The inverse DWT with zero detail bands,
    # A_r^T LL A_c, spreads LL/2 back on the block: their composition is the 2x2 block mean.
    ll = rows @ x @ cols.T
    torch.testing.assert_close(ll[..., 0, 0], x[..., :2, :2].sum(dim=(-2, -1)) / 2)
    direct = rows.T @ ll @ cols
    torch.testing.assert_close(haar_low_pass(x), direct, rtol=0, atol=1e-15)
    torch.testing.assert_close(haar_low_pass(direct), direct, rtol=0, atol=1e-15)  # idempotent
    blocky = torch.rand(1, 1, 4, 4, dtype=torch.float64).repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(haar_low_pass(blocky), blocky, rtol=0, atol=1e-15)
    odd = torch.rand(1, 1, 5, 5, dtype=torch.float64)
    assert haar_low_pass(odd).shape == odd.shape


def test_tanh_round_trip_and_zero_steps_return_the_input(trained) -> None:
    model, x, y = trained["model"], trained["x"].clone(), trained["y"]
    x[0] = 0.0
    x[1] = 1.0
    assert (from_tanh_space(to_tanh_space(x)) - x).abs().max() < 1e-6
    for kw in ({"iterations": 0}, {"lr": 0.0, "iterations": 3}):
        x_adv = SSAH(ThreatModel("linf", EPS), project="none", **kw)(model, x, y)
        assert (x_adv - x).abs().max() < 1e-6


def test_hard_negatives_are_picked_once_then_frozen(trained, monkeypatch) -> None:
    model, x, y = trained["model"], trained["x"], trained["y"]
    seen: list[torch.Tensor] = []
    real = ssa_module.ssa_loss

    def spy(feats, clean, negatives, margin):
        seen.append(negatives.clone())
        return real(feats, clean, negatives, margin)

    monkeypatch.setattr(ssa_module, "ssa_loss", spy)
    SSAH(ThreatModel("linf", EPS), iterations=6, lr=0.05, lambda_lf=0.0)(model, x, y)
    assert len(seen) == 6 and all(torch.equal(s, seen[0]) for s in seen)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        xc = x[correct]
        f = F.normalize(model.block2(model.block1(xc)).flatten(1), dim=1)
        f_start = F.normalize(
            model.block2(model.block1(from_tanh_space(to_tanh_space(xc)))).flatten(1), dim=1
        )
    assert torch.equal(seen[0], (f_start @ f.T).argmin(1))
    assert not torch.equal(seen[0], torch.arange(len(seen[0])))  # the negative is another image


@pytest.mark.parametrize("project", ["every_step", "final"])
def test_projected_modes_stay_in_ball_and_box_and_report_it(trained, project) -> None:
    model, x, y = trained["model"], trained["x"], trained["y"]
    attack = SSAH(ThreatModel("linf", EPS), iterations=8, lr=0.05, project=project, batch_size=16)
    x_adv = attack(model, x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv - x).abs().max() <= EPS + 1e-7
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert torch.equal(x_adv[wrong], x[wrong])
    r = attack.report
    assert r["projection"] == project and r["batch_size"] == 16 and r["attacked"] == int((~wrong).sum())
    linf = (x_adv - x).flatten(1).abs().amax(1)[~wrong]
    assert r["mean_linf"] == pytest.approx(float(linf.mean()), abs=1e-6)
    assert r["max_linf"] == pytest.approx(float(linf.max()), abs=1e-6) and r["max_linf"] <= EPS + 1e-7
    if project == "final":
        assert r["mean_linf_unprojected"] > r["mean_linf"]  # lr 0.05 leaves the ball before the projection


def test_unbounded_mode_leaves_the_ball(trained) -> None:
    model, x, y = trained["model"], trained["x"], trained["y"]
    attack = SSAH(ThreatModel("linf", EPS), iterations=8, lr=0.05, project="none")
    x_adv = attack(model, x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert attack.report["max_linf"] > EPS and attack.report["projection"] == "none"


def test_ssa_preset_is_ssah_without_the_low_frequency_term(trained) -> None:
    model, x, y = trained["model"], trained["x"], trained["y"]
    threat = ThreatModel("linf", EPS)
    ssa = build_attack({"name": "ssa", "iterations": 5, "lr": 0.05}, threat)
    ssah = build_attack({"name": "ssah", "iterations": 5, "lr": 0.05}, threat)
    assert (ssa.name, ssa.lambda_lf, ssah.name, ssah.lambda_lf) == ("ssa", 0.0, "ssah", 0.1)
    assert ssa.project == "every_step" and ssa.describe()["batch_size"] == 500
    same = SSAH(threat, iterations=5, lr=0.05, lambda_lf=0.0)
    assert torch.equal(ssa(model, x, y), same(model, x, y))
    assert not torch.equal(ssa(model, x, y), ssah(model, x, y))  # the low-frequency term changes the path


def test_feature_similarity_decreases_and_accuracy_drops(trained) -> None:
    model, x, y = trained["model"], trained["x"], trained["y"]

    def cos_after(iterations: int) -> float:
        x_adv = SSAH(ThreatModel("linf", EPS), iterations=iterations, lr=0.01)(model, x, y)
        with torch.no_grad():
            f0, f1 = (model.block2(model.block1(v)).flatten(1) for v in (x, x_adv))
        return float(F.cosine_similarity(f0, f1).mean())

    c0, c5, c20 = cos_after(0), cos_after(5), cos_after(20)
    assert c20 < c5 < c0 <= 1.0 + 1e-6


def test_deterministic_and_the_reference_attack_fools_the_model(trained) -> None:
    """SSA ascends a feature-similarity loss, not the classification loss: on this small digit model
    the cosine similarity of penultimate features moves little inside eps = 0.1, so accuracy drops are
    checked on the unbounded reference attack (project=none). It is not "at least as strong as PGD-20"
    (SLIM Table 4 reports the same for a standard ResNet-18: PGD-20 0.00 vs SSA 31.79)."""
    model, x, y = trained["model"], trained["x"], trained["y"]
    threat = ThreatModel("linf", EPS)
    a = SSAH(threat, iterations=5, lr=0.01)(model, x, y)
    b = SSAH(threat, iterations=5, lr=0.01)(model, x, y)
    assert torch.equal(a, b)
    attack = SSAH(threat, iterations=30, lr=0.02, lambda_lf=0.0, project="none")
    x_adv = attack(model, x, y)
    with torch.no_grad():
        clean, adv = ((model(v).argmax(1) == y).float().mean().item() for v in (x, x_adv))
    assert adv < clean and attack.report["attack_success_rate"] > 0


def test_bounded_ssah_is_weaker_than_pgd20_so_the_issue_requirement_cannot_hold(trained) -> None:
    """Issue 5 asks SSAH to be at least as strong as PGD-20 on a tiny standard-trained model. It is not,
    and should not be: SSAH maximizes feature dissimilarity, not the classification loss, and SLIM's own
    Table 4 shows the same gap (standard ResNet-18: PGD-20 0.00, SSA 31.79). This test records the gap
    with the paper settings (150 Adam steps, lr 1e-3, every-step projection) so the deviation is visible."""
    model, x, y = trained["model"], trained["x"], trained["y"]
    threat = ThreatModel("linf", EPS)
    x_pgd = PGD(threat, steps=20, step_size=EPS / 4)(model, x, y)
    x_ssah = build_attack({"name": "ssah"}, threat)(model, x, y)
    assert (x_ssah - x).abs().max() <= EPS + 1e-6
    with torch.no_grad():
        clean, pgd, ssah = ((model(v).argmax(1) == y).float().mean().item() for v in (x, x_pgd, x_ssah))
    assert pgd < clean  # PGD-20 breaks the model, so the comparison is not vacuous
    assert pgd < ssah <= clean


def test_suite_records_projection_linf_and_batch_size(trained) -> None:
    model, x, y = trained["model"], trained["x"], trained["y"]
    attack = build_attack({"name": "ssah", "iterations": 3, "batch_size": 8}, ThreatModel("linf", EPS))
    result = evaluate_accuracy(model, attack, (x * 255).round().to(torch.uint8), y, batch_size=4)
    details = result["details"]
    assert {"projection", "mean_linf", "max_linf", "batch_size"} <= set(details)
    assert details["batch_size"] == 8 and details["projection"] == "every_step"
    assert result["attack"]["batch_size"] == 8 and result["forward_passes"] > 0


def test_restores_mode_and_requires_grad_even_on_error(trained) -> None:
    model = SmallNet().train()
    model.fc.bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x, y = trained["x"][:4], trained["y"][:4]
    SSAH(ThreatModel("linf", EPS), iterations=2)(model, x, y)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with pytest.raises(ConfigError, match="nope"):
        SSAH(ThreatModel("linf", EPS), iterations=2, feature_input_of="nope")(model, x, torch.zeros_like(y))
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize(
    "node,match",
    [
        ({"name": "ssah", "project": "sometimes"}, "project"),
        ({"name": "ssa", "lambda_lf": 0.1}, "lambda_lf"),
        ({"name": "ssah", "iterations": -1}, "iterations"),
        ({"name": "ssah", "batch_size": 0}, "batch_size"),
        ({"name": "ssah", "lr": -0.1}, "lr"),
    ],
)
def test_bad_values_raise_config_error(node, match) -> None:
    with pytest.raises(ConfigError, match=match):
        build_attack(node, ThreatModel("linf", EPS))


def test_validation_names_the_key(compose) -> None:
    from robust_train.config import validate_train_config

    cfg = compose(
        ["eval=full", "logger=none", "eval.attacks.ssa.project=sometimes", "eval.attacks.ssa.lambda_lf=0.5"]
    )
    with pytest.raises(ConfigError) as err:
        validate_train_config(cfg)
    text = str(err.value)
    assert "eval.attacks.ssa.project='sometimes'" in text and "every_step, final, none" in text
    assert "eval.attacks.ssa.lambda_lf" in text
