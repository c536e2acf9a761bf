"""CW and PGD-L2 budgets; the AutoAttack adapter (docs/methods/autoattack.md#tests, docs/methods/pgd.md#tests)
against the official package."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from robust_train.attacks import AutoAttack, ThreatModel, build_attack, ce_objective
from robust_train.attacks.losses import cw_objective, margin
from robust_train.evaluation.suite import evaluate_accuracy

EPS = 8 / 255
LINF = ThreatModel("linf", EPS)


def _load(name: str) -> object:
    """A preset of robust_train/conf/attack as written, without its `defaults` list (the schema's
    defaults, which Hydra composes it over, are filled in by build_attack's validation)."""
    node = OmegaConf.load(f"robust_train/conf/attack/{name}.yaml")
    node.pop("defaults", None)
    return node


def _preset(name: str) -> object:
    """A preset of robust_train/conf/attack with `${threat.step}` resolved as the CIFAR configs set it."""
    root = OmegaConf.create({"threat": {"step": "2/255"}, "attack": _load(name)})
    return root.attack


def _opposed_model() -> tuple[nn.Module, torch.Tensor]:
    """A linear 10-class model on 3x8x8 inputs on which CE and the CW margin ascend in opposite directions.

    With s = u.(x - 0.5), |u|_1 = 1 and A = 2/EPS, the logits are z_0 = 0 (the true class),
    z_1 = -1.8 + A s and z_2..z_9 = -2.2 - A s. Class 1 is the runner-up, so the margin pushes s up (+sign(u)
    on every pixel) and ends at z_1 = +0.2 > z_0: every point is fooled. Cross-entropy weighs the runners-up
    by probability, and classes 2..9 together outweigh class 1 (8 e^-2.2 > e^-1.8), so CE pushes s down and
    ends at z_k = -0.2 < z_0: no point is fooled. An L-inf sign step moves s by its size on every pixel, so
    this holds from any start in the ball (the CE balance point is 10 random-start deviations away).
    """
    d = 3 * 8 * 8
    # Not seed 0: the attacks' random start is drawn after torch.manual_seed(0) and would correlate with u.
    u = torch.where(torch.rand(d, generator=torch.Generator().manual_seed(5)) < 0.5, -1.0, 1.0) / d
    a = 2 / EPS
    lin = nn.Linear(d, 10)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[1] = a * u
        lin.weight[2:] = -a * u
        lin.bias.copy_(torch.tensor([0.0, -1.8] + [-2.2] * 8) - lin.weight @ torch.full((d,), 0.5))
    return nn.Sequential(nn.Flatten(), lin), u.sign().view(3, 8, 8)


def _opposed_data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Points with s = 0 (pixels spread over [0.2, 0.8]), all of class 0."""
    _, sign_u = _opposed_model()
    x = 0.5 + 0.3 * (2 * torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(2)) - 1)
    s = (sign_u * (x - 0.5)).flatten(1).sum(1) / sign_u.numel()
    return x - s.view(-1, 1, 1, 1) * sign_u, torch.zeros(n, dtype=torch.long)


def _run_seeded(attack, model, x, y, objective=None, seed: int = 0) -> torch.Tensor:
    # build_attack gives PGD no generator, so the random start comes from the global RNG.
    torch.manual_seed(seed)
    return attack(model, x, y, objective)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_cw_stays_in_ball_and_lowers_the_margin(tiny_model, batch) -> None:
    x, y = batch
    tiny_model.eval()
    cw = build_attack({"name": "cw", "steps": 10, "step": 2 / 255}, LINF)
    assert cw.describe()["loss"] == "cw" and cw.name == "cw"
    x_adv = cw(tiny_model, x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        assert margin(tiny_model(x_adv), y).mean() < margin(tiny_model(x), y).mean()


def test_cw20_ascends_the_margin_where_pgd20_ascends_ce() -> None:
    model, sign_u = _opposed_model()
    x, y = _opposed_data()
    cw20, pgd20 = build_attack(_preset("cw20"), LINF), build_attack(_preset("pgd20"), LINF)
    assert (cw20.name, cw20.steps, cw20.kappa) == ("cw", 20, 50.0)
    x_cw, x_ce = _run_seeded(cw20, model, x, y), _run_seeded(pgd20, model, x, y)
    assert _accuracy(model, x, y) == 1.0
    assert _accuracy(model, x_cw, y) == 0.0 and _accuracy(model, x_ce, y) == 1.0
    # Opposite corners of the ball: every pixel's gradient sign differs between the two losses.
    torch.testing.assert_close(x_cw - x, EPS * sign_u.expand_as(x), rtol=0, atol=1e-6)
    torch.testing.assert_close(x_ce - x, -EPS * sign_u.expand_as(x), rtol=0, atol=1e-6)


def _hand_cw_pgd(model, x, y, kappa: float, steps: int, alpha: float, seed: int) -> torch.Tensor:
    """CW-PGD written out from docs/methods/pgd.md#pgd, docs/methods/pgd.md#cw with the margin loss,
    independently of robust_train."""
    torch.manual_seed(seed)
    delta = ((2 * torch.rand(x.shape, dtype=x.dtype) - 1) * EPS).clamp(-EPS, EPS)
    delta = torch.min(torch.max(delta, -x), 1 - x)
    true = F.one_hot(y, 10).bool()
    for _ in range(steps):
        delta.requires_grad_(True)
        z = model(x + delta)
        z_other = z.masked_fill(true, -float("inf")).max(1).values
        loss = -(z[true] - z_other + kappa).clamp(min=0)
        (g,) = torch.autograd.grad(loss.sum(), delta)
        delta = (delta.detach() + alpha * g.sign()).clamp(-EPS, EPS)
        delta = torch.min(torch.max(delta, -x), 1 - x)
    return (x + delta).clamp(0, 1)


def test_cw_matches_a_hand_written_margin_pgd_loop_for_each_kappa(tiny_model, batch) -> None:
    x, y = batch
    x, model = x.double(), tiny_model.double().eval()
    hand = {k: _hand_cw_pgd(model, x, y, k, steps=20, alpha=2 / 255, seed=3) for k in (0.0, 50.0)}
    # kappa=0 freezes the points the random start leaves misclassified, so the two runs must differ.
    assert not torch.equal(hand[0.0], hand[50.0])
    for kappa, expected in hand.items():
        node = {"name": "cw", "steps": 20, "step": "2/255", "random_start": "uniform", "kappa": kappa}
        x_adv = _run_seeded(build_attack(node, LINF), model, x, y, seed=3)
        torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-12)


def test_pgd_node_with_cw_loss_ascends_the_margin() -> None:
    model, sign_u = _opposed_model()
    x, y = _opposed_data()
    pgd_cw = build_attack({"name": "pgd", "steps": 20, "step": "2/255", "loss": "cw"}, LINF)
    assert pgd_cw.name == "pgd" and pgd_cw.describe()["loss"] == "cw"
    x_adv = _run_seeded(pgd_cw, model, x, y)
    assert _accuracy(model, x_adv, y) == 0.0
    torch.testing.assert_close(x_adv, _run_seeded(build_attack(_preset("cw20"), LINF), model, x, y))


def test_caller_objective_overrides_the_configured_loss() -> None:
    model, _ = _opposed_model()
    x, y = _opposed_data()
    cw20, pgd20 = build_attack(_preset("cw20"), LINF), build_attack(_preset("pgd20"), LINF)
    x_cw, x_ce = _run_seeded(cw20, model, x, y), _run_seeded(pgd20, model, x, y)
    assert not torch.equal(x_cw, x_ce)
    torch.testing.assert_close(_run_seeded(cw20, model, x, y, ce_objective(y)), x_ce, rtol=0, atol=0)
    torch.testing.assert_close(_run_seeded(pgd20, model, x, y, cw_objective(y)), x_cw, rtol=0, atol=0)


def test_pgd_l2_preset_stays_in_l2_ball(tiny_model, batch) -> None:
    x, y = batch
    node = _load("pgd_l2")
    attack = build_attack(node, LINF)
    assert attack.threat == ThreatModel("l2", 0.5)
    x_adv = attack(tiny_model, x, y)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5 and 0 <= x_adv.min() and x_adv.max() <= 1


class ConstantLogits(nn.Module):
    """Ignores its input: no attack can change its prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.arange(10, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 10) + 0.0 * x.flatten(1).sum(1, keepdim=True)


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _template_model() -> tuple[nn.Module, torch.Tensor]:
    """Linear 10-class model on 3x8x8 inputs: z_k = t_k.(x - 128/255) / (d EPS), t_k a random +-1 pattern.

    At x = 128/255 + m t_y the margin to class j is (m/EPS)(1 - t_j.t_y/d), and the best L-inf move of size
    EPS (EPS sign(t_j - t_y)) closes exactly (1 - t_j.t_y/d): a point is foolable iff m < EPS.
    """
    d = 3 * 8 * 8
    t = torch.where(torch.rand(10, d, generator=torch.Generator().manual_seed(7)) < 0.5, -1.0, 1.0)
    lin = nn.Linear(d, 10)
    with torch.no_grad():
        lin.weight.copy_(t / (d * EPS))
        lin.bias.copy_(-lin.weight.sum(1) * 128 / 255)
    return nn.Sequential(nn.Flatten(), lin), t


def _template_data(n: int = 16, n_wrong: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correct points alternating m = 4/255 (foolable) and 16/255 (robust), then `n_wrong` clean mistakes.

    Returns x, y and the mask of points that a working attack leaves correctly classified. Pixels are
    k/255 computed as the suite's uint8 -> float conversion does, so that round trip is exact.
    """
    _, t = _template_model()
    y = torch.arange(n) % 10
    m = torch.where(torch.arange(n) % 2 == 0, 4, 16)
    shown = torch.where(torch.arange(n) >= n - n_wrong, (y + 1) % 10, y)  # the mistakes show another class
    x = (128 + m.view(-1, 1) * t[shown]).view(n, 3, 8, 8).div(255)
    return x, y, (m > 8) & (shown == y)


def test_template_model_is_accurate_and_foolable_as_designed() -> None:
    model, t = _template_model()
    x, y, robust = _template_data(16, n_wrong=4)
    assert torch.equal(model(x).argmax(1) == y, torch.arange(16) < 12)
    # The model is linear, so the best L-inf move against class j is EPS sign(t_j - t_y): trying every j
    # decides exactly which points any attack can fool.
    fooled = torch.zeros(16, dtype=torch.bool)
    with torch.no_grad():
        for j in range(10):
            fooled |= model(x + EPS * (t[j] - t[y]).sign().view(x.shape)).argmax(1) != y
    assert torch.equal(~fooled, robust) and robust.sum() == 6


def test_constant_model_robust_accuracy_equals_clean() -> None:
    x, y = _data()
    y[:9] = 9  # the constant prediction: 9 of 12 correct
    model = ConstantLogits()
    aa = AutoAttack(LINF, version="lite", batch_size=6)
    x_adv = aa(model, x, y)
    clean = (model(x).argmax(1) == y).float().mean().item()
    robust = (model(x_adv).argmax(1) == y).float().mean().item()
    assert clean == robust == 0.75
    assert aa.report["robust_accuracy_after"] == {"apgd-ce": 75.0, "apgd-t": 75.0}


def test_output_in_ball_fools_foolable_leaves_misclassified_and_restores_mode() -> None:
    model, _ = _template_model()
    x, y, robust = _template_data(16, n_wrong=4)
    wrong = torch.arange(16) >= 12
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    model.train()
    model[1].weight.requires_grad_(False)  # a mixed state must come back as it was
    x_adv = AutoAttack(LINF, version="lite", batch_size=6)(model, x, y)
    assert modes and not any(modes)  # every forward of the attack ran in eval mode
    assert model.training and model[1].bias.requires_grad and not model[1].weight.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv[wrong], x[wrong])
    assert torch.equal(model(x_adv).argmax(1) == y, robust)


def test_standard_version_is_the_official_configuration(tiny_model) -> None:
    official = AutoAttack(LINF).make_official(tiny_model, torch.device("cpu"))
    assert official.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert official.apgd.n_iter == 100 and official.apgd.n_restarts == 1
    assert official.apgd_targeted.n_target_classes == 9 and official.fab.n_target_classes == 9
    assert official.square.n_queries == 5000
    assert type(official).__module__.startswith("pyautoattack")


def test_adapter_agrees_with_calling_pyautoattack_directly() -> None:
    from pyautoattack import AutoAttack as Official

    model, _ = _template_model()
    x, y, robust = _template_data(16)
    aa = AutoAttack(LINF, version="lite", seed=0, batch_size=8)
    ours = aa(model, x, y)
    direct = Official(model, norm="Linf", eps=EPS, version="standard", device="cpu", seed=0)
    direct.attacks_to_run = ["apgd-ce", "apgd-t"]
    x_direct, _ = direct.run_standard_evaluation(x, y, batch_size=8)
    # Half the points are foolable: an adapter that attacked nothing would report 100% here.
    assert _accuracy(model, x, y) == 1.0 and robust.float().mean() == 0.5
    assert torch.equal(model(ours).argmax(1) == y, robust)
    assert aa.report["robust_accuracy_after"] == {"apgd-ce": 50.0, "apgd-t": 50.0}
    torch.testing.assert_close(ours, x_direct, rtol=0, atol=0)


def test_resumes_from_state_after_interruption(tmp_path) -> None:
    model, _ = _template_model()
    x, y, robust = _template_data(12)
    state = tmp_path / "aa.pt"
    started: list[list[str]] = []

    def interrupting(aa: AutoAttack, stop_at: int):
        original = aa.make_official

        def make(m, device):
            obj = original(m, device)
            run = obj.run_standard_evaluation

            def run_or_stop(*args, **kwargs):
                started.append(list(obj.attacks_to_run))
                if len(started) == stop_at:
                    raise KeyboardInterrupt  # the job is killed while this attack runs
                return run(*args, **kwargs)

            obj.run_standard_evaluation = run_or_stop
            return obj

        aa.make_official = make
        return aa

    aa = interrupting(AutoAttack(LINF, version="lite", batch_size=12, state_path=state), 2)
    with pytest.raises(KeyboardInterrupt):
        aa(model, x, y)
    saved = torch.load(state, weights_only=True)
    assert list(saved["done"]) == ["apgd-ce"]
    aa2 = interrupting(AutoAttack(LINF, version="lite", batch_size=12, state_path=state), 0)
    resumed = aa2(model, x, y)
    assert started == [["apgd-ce"], ["apgd-t"], ["apgd-t"]]  # apgd-ce is not run again
    assert list(aa2.report["robust_accuracy_after"]) == ["apgd-ce", "apgd-t"]
    # What apgd-ce found before the interruption survives the resume: it is not run again to re-find it.
    assert torch.equal(model(resumed).argmax(1) == y, robust)
    uninterrupted = AutoAttack(LINF, version="lite", batch_size=12)
    torch.testing.assert_close(resumed, uninterrupted(model, x, y), rtol=0, atol=0)
    assert aa2.report["robust_accuracy_after"] == uninterrupted.report["robust_accuracy_after"]


def test_suite_passes_the_whole_set_to_autoattack_and_records_details() -> None:
    model, _ = _template_model()
    x, y, robust = _template_data(10, n_wrong=1)
    xu8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(xu8.float() / 255, x)
    aa = AutoAttack(LINF, version="lite")
    calls: list[int] = []
    perturb = aa.perturb
    aa.perturb = lambda m, xb, yb, o: calls.append(len(xb)) or perturb(m, xb, yb, o)
    result = evaluate_accuracy(model, aa, xu8, y, 4)
    assert calls == [10] and result["n"] == 10
    assert robust.sum() == 4 and result["accuracy"] == 40.0
    assert result["details"]["clean_accuracy"] == pytest.approx(90.0)
    assert result["details"]["robust_accuracy_after"]["apgd-t"] == pytest.approx(40.0)
    assert result["details"]["package"] == "pyautoattack"
