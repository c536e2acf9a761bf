"""CW and PGD-L2 budgets; the AutoAttack adapter (base spec §10) against the official package."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from robust_train.attacks import AutoAttack, ThreatModel, build_attack
from robust_train.attacks.losses import margin
from robust_train.evaluation.suite import evaluate_accuracy

EPS = 8 / 255


def test_cw_stays_in_ball_and_lowers_the_margin(tiny_model, batch) -> None:
    x, y = batch
    tiny_model.eval()
    cw = build_attack({"name": "cw", "steps": 10, "step": 2 / 255}, ThreatModel("linf", EPS))
    assert cw.describe()["loss"] == "cw" and cw.name == "cw"
    x_adv = cw(tiny_model, x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-7 and 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        assert margin(tiny_model(x_adv), y).mean() < margin(tiny_model(x), y).mean()


def test_pgd_l2_preset_stays_in_l2_ball(tiny_model, batch) -> None:
    x, y = batch
    node = OmegaConf.load("conf/attack/pgd_l2.yaml")
    attack = build_attack(node, ThreatModel("linf", EPS))
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


def test_constant_model_robust_accuracy_equals_clean() -> None:
    x, y = _data()
    y[:9] = 9  # the constant prediction: 9 of 12 correct
    model = ConstantLogits()
    aa = AutoAttack(ThreatModel("linf", EPS), version="lite", batch_size=6)
    x_adv = aa(model, x, y)
    clean = (model(x).argmax(1) == y).float().mean().item()
    robust = (model(x_adv).argmax(1) == y).float().mean().item()
    assert clean == robust == 0.75
    assert aa.report["robust_accuracy_after"] == {"apgd-ce": 75.0, "apgd-t": 75.0}


def test_output_in_ball_misclassified_unchanged_and_mode_restored(tiny_model) -> None:
    x, y = _data()
    tiny_model.train()
    with torch.no_grad():
        tiny_model.eval()
        wrong = tiny_model(x).argmax(1) != y
        tiny_model.train()
    x_adv = AutoAttack(ThreatModel("linf", EPS), version="lite", batch_size=6)(tiny_model, x, y)
    assert tiny_model.training and all(p.requires_grad for p in tiny_model.parameters())
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv[wrong], x[wrong])


def test_standard_version_is_the_official_configuration(tiny_model) -> None:
    official = AutoAttack(ThreatModel("linf", EPS)).make_official(tiny_model, torch.device("cpu"))
    assert official.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert official.apgd.n_iter == 100 and official.apgd.n_restarts == 1
    assert official.apgd_targeted.n_target_classes == 9 and official.fab.n_target_classes == 9
    assert official.square.n_queries == 5000
    assert type(official).__module__.startswith("pyautoattack")


def test_adapter_agrees_with_calling_pyautoattack_directly(tiny_model) -> None:
    from pyautoattack import AutoAttack as Official

    x, y = _data(16)
    tiny_model.eval()
    ours = AutoAttack(ThreatModel("linf", EPS), version="lite", seed=0, batch_size=8)(tiny_model, x, y)
    direct = Official(tiny_model, norm="Linf", eps=EPS, version="standard", device="cpu", seed=0)
    direct.attacks_to_run = ["apgd-ce", "apgd-t"]
    x_direct, _ = direct.run_standard_evaluation(x, y, batch_size=8)
    with torch.no_grad():
        ours_ok = tiny_model(ours).argmax(1) == y
        direct_ok = tiny_model(x_direct).argmax(1) == y
    assert torch.equal(ours_ok, direct_ok)


def test_resumes_from_state_after_interruption(tmp_path) -> None:
    x, y = _data()
    model = ConstantLogits()
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

    aa = interrupting(
        AutoAttack(ThreatModel("linf", EPS), version="lite", batch_size=12, state_path=state), 2
    )
    with pytest.raises(KeyboardInterrupt):
        aa(model, x, y)
    saved = torch.load(state, weights_only=True)
    assert list(saved["done"]) == ["apgd-ce"]
    aa2 = interrupting(
        AutoAttack(ThreatModel("linf", EPS), version="lite", batch_size=12, state_path=state), 0
    )
    aa2(model, x, y)
    assert started == [["apgd-ce"], ["apgd-t"], ["apgd-t"]]  # apgd-ce is not run again
    assert list(aa2.report["robust_accuracy_after"]) == ["apgd-ce", "apgd-t"]


def test_suite_passes_the_whole_set_to_autoattack_and_records_details(tiny_model) -> None:
    x, y = _data(10)
    xu8 = (x * 255).to(torch.uint8)
    result = evaluate_accuracy(tiny_model, AutoAttack(ThreatModel("linf", EPS), version="lite"), xu8, y, 4)
    assert result["n"] == 10 and "apgd-t" in result["details"]["robust_accuracy_after"]
    assert result["details"]["package"] == "pyautoattack"
