"""Training fast path: knobs, bit-identity when off, bf16 autocast, no recompiles, no host sync."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from robust_train.attacks import PGD, Clean, ThreatModel
from robust_train.builders import optimizer_from_config
from robust_train.config import validate_train_config
from robust_train.defenses import build_defense
from robust_train.errors import ConfigError
from robust_train.evaluation.suite import evaluate_accuracy
from robust_train.models import build_model
from robust_train.training.fastpath import FastPath, build_sgd
from robust_train.training.step import TrainStep

EPS, ALPHA = 8 / 255, 2 / 255
OFF = {"amp": False, "channels_last": False, "compile": False, "fused_sgd": False}


def _defense(name: str, steps: int = 2):
    cfg = {"name": name, "attack": {
        "name": "pgd", "steps": steps, "step": ALPHA, "restarts": 1,
        "random_start": "normal" if name == "trades" else "uniform",
        "bn_mode": "eval" if name == "trades" else "train"}}  # fmt: skip
    if name == "trades":  # PGD-AT has no beta (an unknown key is refused)
        cfg["beta"] = 6.0
    return build_defense(OmegaConf.create(cfg), ThreatModel("linf", EPS))


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _prn(width: float = 0.0625) -> nn.Module:
    torch.manual_seed(0)
    return build_model("preact_resnet18", num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, width=width)


def test_auto_resolves_to_cuda_only_and_bad_values_are_refused(compose) -> None:
    assert FastPath.from_config(None, "cpu") == FastPath()
    assert FastPath.from_config(OmegaConf.create({"amp": "auto"}), "cpu").amp is False
    on_gpu = FastPath.from_config(None, "cuda")
    assert (on_gpu.amp, on_gpu.channels_last, on_gpu.fused_sgd, on_gpu.compile) == (True, True, True, False)
    forced = FastPath.from_config(OmegaConf.create({"amp": True, "compile": "true"}), "cpu")
    assert forced.amp and forced.compile and not forced.channels_last
    # The shipped config: every knob present and resolving to the plain path on the CPU.
    cfg = compose(["dataset=synthetic", "logger=none"])
    assert FastPath.from_config(cfg.trainer.fast, "cpu") == FastPath()
    for key, bad in (("amp", "fp16"), ("channels_last", "yes"), ("compile_mode", "fastest")):
        cfg = compose(["dataset=synthetic", "logger=none", f"trainer.fast.{key}={bad}"])
        with pytest.raises(ConfigError, match=f"trainer.fast.{key}"):
            validate_train_config(cfg)


@pytest.mark.parametrize("defense", ["pgd_at", "trades"])
def test_knobs_off_is_bit_identical_to_the_plain_step(tiny_model, batch, defense) -> None:
    x, y = batch
    model_a, model_b = tiny_model, copy.deepcopy(tiny_model)
    fast = FastPath.from_config(OmegaConf.create(OFF), "cpu")
    plain = TrainStep(model_a, _defense(defense), _sgd(model_a))
    knobs_off = TrainStep(model_b, _defense(defense), _sgd(model_b), fast=fast)
    for seed in (3, 4):
        torch.manual_seed(seed)
        ma = plain(x, y)
        torch.manual_seed(seed)
        mb = knobs_off(x, y)
        assert set(ma) == set(mb)
        for key in ma:
            assert torch.equal(ma[key], mb[key]), key
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_bf16_channels_last_step_is_finite_and_attacks_the_input_only(batch) -> None:
    x, y = batch
    model = _prn()
    fast = FastPath(amp=True, channels_last=True)
    fast.prepare_model(model)
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    defense = _defense("pgd_at")
    step = TrainStep(model, defense, _sgd(model), fast=fast)

    seen_grads: list[bool] = []
    attack_dtypes: list[torch.dtype] = []
    inner = step.objective

    def spying_objective(xb, yb):
        objective = inner(xb, yb)

        def wrapped(m, x_adv):
            loss = objective(m, x_adv)
            # Inside the attack no parameter takes part in the gradient; losses come back in fp32.
            seen_grads.append(any(p.requires_grad for p in m.parameters()))
            attack_dtypes.append(loss.dtype)
            return loss

        return wrapped

    step.objective = spying_objective
    x_adv = step.craft(step.fast.prepare_input(x), y)
    assert x_adv is not None and x_adv.dtype == torch.float32
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert seen_grads and not any(seen_grads) and set(attack_dtypes) == {torch.float32}
    assert all(p.grad is None for p in model.parameters())

    before = [p.detach().clone() for p in model.parameters()]
    metrics = step(x, y)
    assert metrics["loss"].dtype == torch.float32 and torch.isfinite(metrics["loss"])
    # Autocast casts inside ops only: the weights and their update stay fp32.
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))

    # The bf16 step tracks the fp32 one (same weights, same attack start).
    ref_model = _prn()
    ref_step = TrainStep(ref_model, _defense("pgd_at"), _sgd(ref_model))
    model_b = _prn()
    fast.prepare_model(model_b)
    fast_step = TrainStep(model_b, _defense("pgd_at"), _sgd(model_b), fast=fast)
    torch.manual_seed(5)
    loss_ref = ref_step(x, y)["loss"]
    torch.manual_seed(5)
    loss_fast = fast_step(x, y)["loss"]
    assert abs(float(loss_fast) - float(loss_ref)) < 0.05 * float(loss_ref) + 0.05


def _forbid_host_reads(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("a training step read a tensor back to the host")

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("defense", ["pgd_at", "trades"])
def test_a_fast_step_never_reads_tensors_back_to_the_host(batch, defense, monkeypatch) -> None:
    x, y = batch
    model = _prn()
    fast = FastPath(amp=True, channels_last=True, fused_sgd=True)
    fast.prepare_model(model)
    opt = optimizer_from_config(
        OmegaConf.create({"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}), model, torch.device("cpu"),
        fused=True,
    )  # fmt: skip
    step = TrainStep(model, _defense(defense), opt, fast=fast)
    _forbid_host_reads(monkeypatch)
    metrics = step(x, y)
    monkeypatch.undo()
    assert all(isinstance(v, torch.Tensor) for v in metrics.values())


def test_fused_sgd_matches_plain_sgd() -> None:
    torch.manual_seed(0)
    a = nn.Linear(6, 3)
    b = copy.deepcopy(a)
    opt_a = build_sgd(a.parameters(), 0.1, 0.9, True, 5e-4, fused=False)
    opt_b = build_sgd(b.parameters(), 0.1, 0.9, True, 5e-4, fused=True)
    assert opt_b.defaults.get("fused") or opt_b.defaults.get("foreach")
    x = torch.randn(5, 6)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_compiled_model_does_not_recompile_across_attack_mode_switches(tiny_model, batch) -> None:
    import torch._dynamo

    x, y = batch
    torch._dynamo.reset()
    compiles = {"n": 0}

    def counting_backend(gm, example_inputs):
        compiles["n"] += 1
        return gm.forward  # run the captured graph eagerly: only the compile count matters here

    model = tiny_model
    state_keys = list(model.state_dict())
    FastPath(compile=True).prepare_model(model, backend=counting_backend)
    assert list(model.state_dict()) == state_keys  # in-place compile: checkpoints are unaffected
    threat = ThreatModel("linf", EPS)
    val_pgd = PGD(threat, steps=2, step_size=ALPHA, bn_mode="eval")
    # PGD-AT attacks in train mode, TRADES in eval mode with a no-grad clean reference: between them
    # every guard state a step and a validation pass switch through.
    steps = [TrainStep(model, _defense(name), _sgd(model)) for name in ("pgd_at", "trades")]

    x_uint8 = (x * 255).round().to(torch.uint8)

    def one_round() -> None:
        for step in steps:
            step(x, y)
        evaluate_accuracy(model, Clean(), x_uint8, y, 8)
        evaluate_accuracy(model, val_pgd, x_uint8, y, 8)

    one_round()
    warm = compiles["n"]
    assert warm >= 2  # train-mode and eval-mode graphs at least
    one_round()
    assert compiles["n"] == warm, f"{compiles['n'] - warm} recompiles after the warm-up round"
    torch._dynamo.reset()
