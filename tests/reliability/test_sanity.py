"""Sanity checks flag a gradient-masked model and pass an honest one; the table says so loudly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robust_train.attacks import ThreatModel
from robust_train.evaluation.sanity import gradient_health, run_sanity_checks, summary_values
from robust_train.tracking.results import failure_lines, format_table

THREAT = ThreatModel(norm="linf", eps=8 / 255)
CFG = {"n_examples": 48, "batch_size": 48, "pgd_steps": 5, "square_queries": 100}


class Linear2(nn.Module):
    """Class 1 iff channel 0 is brighter than channel 1 on average: an honest, exactly solvable model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 2)
        with torch.no_grad():
            w = torch.zeros(3, 8, 8)
            w[0], w[1] = 1.0, -1.0
            self.fc.weight.copy_(torch.stack([-w.flatten(), w.flatten()]) * 2.0)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class Quantized(nn.Module):
    """The same model behind a non-differentiable input quantization: its input gradient is zero."""

    def __init__(self, inner: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * self.levels) / self.levels)


class Noisy(nn.Module):
    """Randomness in the eval-mode forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 0.01 * torch.randn(x.shape[0], 2, device=x.device)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 3, 8, 8), generator=g, dtype=torch.uint8)
    xf = x.float() / 255
    y = (xf[:, 0].mean((1, 2)) > xf[:, 1].mean((1, 2))).long()
    return x, y


def test_honest_model_passes(data) -> None:
    x, y = data
    report = run_sanity_checks(Linear2(), x, y, THREAT, CFG)
    assert report["passed"], report
    assert report["clean_acc"] == 100.0 and not report["warnings"]
    assert set(report["checks"]) >= {"robust_le_clean", "more_steps", "large_eps", "blackbox_not_stronger"}
    assert report["checks"]["gradient_health"]["zero_frac"] == 0.0


def test_gradient_masked_model_is_flagged(data) -> None:
    x, y = data
    report = run_sanity_checks(Quantized(Linear2()), x, y, THREAT, CFG)
    assert not report["passed"]
    # Zero gradients are seen directly; the attacks they blind lose to a huge radius and to Square.
    assert {"gradient_health", "large_eps", "blackbox_not_stronger"} <= set(report["failed"]), report[
        "failed"
    ]
    assert report["checks"]["gradient_health"]["zero_frac"] == 1.0
    evaluation = {"last": {"epoch": 1, "attacks": {"clean": {"accuracy": 90.0, "n": 48}}, "sanity": report}}
    table = format_table(evaluation)
    assert "SANITY CHECK FAILED [last] gradient_health" in table and "FAILED" in table.splitlines()[3]
    assert summary_values("last", report)["sanity/last/passed"] is False


def test_randomized_forward_is_a_warning(data) -> None:
    x, y = data
    report = run_sanity_checks(Noisy(Linear2()), x, y, THREAT, {**CFG, "square_queries": 0})
    assert report["warnings"] == ["deterministic_forward"]
    assert any("attack with EOT" in line for line in failure_lines({"best": {"sanity": report}}))


def test_robust_above_clean_in_suite_results_fails(data) -> None:
    x, y = data
    suite = {"clean": {"accuracy": 50.0}, "pgd20": {"accuracy": 60.0}}
    report = run_sanity_checks(Linear2(), x, y, THREAT, {**CFG, "square_queries": 0}, suite_results=suite)
    assert (
        report["failed"] == ["robust_le_clean"]
        and "pgd20 60.00%" in report["checks"]["robust_le_clean"]["detail"]
    )


def test_nan_gradients_count_as_dead() -> None:
    class NaNGrad(nn.Module):
        def forward(self, x):
            return torch.stack([torch.sqrt(x.flatten(1) - 2).sum(1), x.flatten(1).sum(1)], 1)

    g = gradient_health(NaNGrad(), torch.rand(4, 3, 2, 2), torch.zeros(4, dtype=torch.long), 4)
    assert g["nonfinite_frac"] == 1.0


class _SummaryRun:
    id = "sum1"

    def __init__(self) -> None:
        self.summary: dict = {}

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def log(self, metrics, step=None) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def test_robust_eval_records_flags_in_results_and_wandb(compose, tmp_path, monkeypatch, capsys) -> None:
    import json

    import wandb
    from omegaconf import OmegaConf

    from robust_train.builders import model_from_config
    from robust_train.commands.evaluate import evaluate_checkpoint
    from robust_train.tracking.checkpoint import save_checkpoint

    train_cfg = compose(["debug=fast", "logger=none"])
    model = model_from_config(train_cfg.model, num_classes=10, mean=[0.1307] * 3, std=[0.3081] * 3)
    ckpt = tmp_path / "best.pt"
    config = OmegaConf.to_container(train_cfg, resolve=True)
    save_checkpoint({"config": config, "epoch": 1, "model": model.state_dict()}, ckpt)
    run = _SummaryRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    cfg = compose(
        [f"checkpoint={ckpt}", "logger=wandb", "eval=quick", "eval.n_examples=16", "device=cpu",
         "eval.sanity.n_examples=16", "eval.sanity.pgd_steps=2", "eval.sanity.square_queries=20"],
        config_name="evaluate",
    )  # fmt: skip
    res = evaluate_checkpoint(cfg, tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "results.json").read_text())["eval"]["best"]["sanity"]
    assert report == res["eval"]["best"]["sanity"] and set(report["checks"]) == {
        "robust_le_clean", "more_steps", "more_restarts", "large_eps", "blackbox_not_stronger",
        "gradient_health", "deterministic_forward",
    }  # fmt: skip
    assert run.summary["sanity/best/passed"] == report["passed"]
    assert run.summary["sanity/best/gradient_health"] == report["checks"]["gradient_health"]["passed"]
    assert "| sanity |" in capsys.readouterr().out


def test_constant_model_is_not_judged_at_large_eps(data) -> None:
    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, device=x.device)
            logits[:, 1] = 1.0
            return logits + self.w * x.flatten(1).mean(1, keepdim=True)

    x, y = data
    report = run_sanity_checks(Constant(), x, y, THREAT, {**CFG, "square_queries": 0})
    assert (
        report["checks"]["large_eps"]["passed"]
        and "predicts class 1" in report["checks"]["large_eps"]["detail"]
    )
