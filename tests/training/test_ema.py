"""Weight averaging (training/ema.py): the update against a float64 loop, the warm-up, BatchNorm buffers,
no host sync, fp32 averages, exact resume, the checkpoint rules, and the `ema` kind in results, the
console table, robust-report and W&B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from robust_train.commands.evaluate import evaluate_checkpoint
from robust_train.commands.train import train_run
from robust_train.config import check_run
from robust_train.errors import CheckpointError
from robust_train.evaluation.evaluate import log_evaluation
from robust_train.report import build_report, load_local_runs
from robust_train.report.runs import _wandb_record
from robust_train.tracking.checkpoint import load_checkpoint
from robust_train.tracking.results import format_table
from robust_train.tracking.wandb_run import Tracker
from robust_train.training.ema import EMA, checkpoint_weights, warmup_decay


class TinyCNN(nn.Module):
    """A 10-class CNN with BatchNorm (its running statistics are what the buffer rules act on)."""

    def __init__(self, channels: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- the update


def _perturb(model: nn.Module, g: torch.Generator) -> None:
    """A stand-in optimizer step: new weights and new BatchNorm statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.mul_(1.5)
                m.num_batches_tracked += 1


def _reference(model: nn.Module, decays: list[float], g: torch.Generator, names: list[str]) -> dict:
    """The hand-written float64 loop: ema <- d * ema + (1 - d) * w, tensor by tensor."""
    state = model.state_dict()
    ema = {n: state[n].double().clone() for n in names}
    for d in decays:
        _perturb(model, g)
        state = model.state_dict()
        for n in names:
            ema[n] = d * ema[n] + (1.0 - d) * state[n].double()
    return ema


def test_warmup_formula_is_min_of_decay_and_1_plus_n_over_10_plus_n(tiny_model) -> None:
    ema = EMA(tiny_model, decay=0.995)
    seen = []
    for _ in range(2500):
        seen.append(ema.current_decay())
        ema.updates += 1  # the counter alone drives the decay
    assert seen[0] == 0.1  # n = 0: (1 + 0) / (10 + 0)
    assert seen[1] == 2 / 11 and seen[10] == 11 / 20
    assert seen == [min(0.995, (1 + n) / (10 + n)) for n in range(2500)]
    # The warm-up ends where (1 + n) / (10 + n) reaches the decay: n = (10 d - 1) / (1 - d) = 1,790.
    assert seen[1789] < 0.995 and seen[1791] == 0.995
    assert warmup_decay(0.5, 0) == 0.1 and warmup_decay(0.5, 100) == 0.5
    flat = EMA(tiny_model, decay=0.9, warmup=False)
    assert flat.current_decay() == 0.9


def test_update_equals_a_float64_loop_over_parameters_with_the_warmup() -> None:
    torch.manual_seed(0)
    reference_model = TinyCNN().double()
    torch.manual_seed(0)
    model = TinyCNN().double()
    names = [n for n, _ in model.named_parameters()]
    decays = [min(0.6, (1 + n) / (10 + n)) for n in range(20)]  # passes 0.6 at n = 13: both regimes
    expected = _reference(reference_model, decays, torch.Generator().manual_seed(0), names)
    ema = EMA(model, decay=0.6)
    g = torch.Generator().manual_seed(0)
    used = []
    for _ in range(20):
        _perturb(model, g)  # the same steps as the reference's
        used.append(ema.current_decay())
        ema.update()
    assert used == decays and ema.updates == 20
    averaged = ema.weights()
    for n in names:
        assert averaged[n].dtype == torch.float32  # an fp32 average, even of a float64 model
        assert torch.allclose(averaged[n].double(), expected[n], rtol=1e-5, atol=1e-6), n
    # The trained weights are the reference's: the average never writes into them.
    for n, p in model.named_parameters():
        assert torch.equal(p, reference_model.state_dict()[n]), n


def test_start_copies_the_weights_then_counts_the_warmup_from_zero() -> None:
    torch.manual_seed(0)
    model = TinyCNN()
    ema = EMA(model, decay=0.9, start=0.05)
    assert ema.copy_until is None
    ema.plan(100)  # 5% of 100 steps
    ema.plan(1000)  # fixed once
    assert ema.copy_until == 5
    g = torch.Generator().manual_seed(1)
    decays = []
    for i in range(8):
        _perturb(model, g)
        decays.append(ema.current_decay())
        ema.update()
        if i < 5:
            assert all(torch.equal(a, p) for a, p in zip(ema.averaged, model.parameters())), i
    assert decays == [0.0] * 5 + [0.1, 2 / 11, 3 / 12]


def test_bn_buffers_are_copied_by_default_and_averaged_on_request() -> None:
    torch.manual_seed(0)
    copy_model, avg_model = TinyCNN().double(), TinyCNN().double()
    avg_model.load_state_dict(copy_model.state_dict())
    copy_ema = EMA(copy_model, decay=0.5)
    avg_ema = EMA(avg_model, decay=0.5, buffers="average")
    assert "bn.running_mean" not in copy_ema.state_dict()["tensors"]  # copy: nothing stored
    assert {"bn.running_mean", "bn.running_var"} <= set(avg_ema.state_dict()["tensors"])
    start = {k: v.double().clone() for k, v in avg_model.state_dict().items()}
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    expected = dict(start)
    for n in range(6):
        _perturb(copy_model, g1)
        _perturb(avg_model, g2)
        d = min(0.5, (1 + n) / (10 + n))
        for k in ("bn.running_mean", "bn.running_var"):
            expected[k] = d * expected[k] + (1 - d) * avg_model.state_dict()[k].double()
        copy_ema.update()
        avg_ema.update()
    copied, averaged = copy_ema.weights(), avg_ema.weights()
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(copied[k], copy_model.state_dict()[k]), k  # the trained model's statistics
    for k in ("bn.running_mean", "bn.running_var"):
        assert torch.allclose(averaged[k].double(), expected[k], rtol=1e-5, atol=1e-6), k
        assert not torch.allclose(averaged[k].double(), avg_model.state_dict()[k].double())
    assert torch.equal(averaged["bn.num_batches_tracked"], avg_model.bn.num_batches_tracked)


def test_update_is_one_fused_call_and_reads_nothing_from_the_device(tiny_model, monkeypatch) -> None:
    ema = EMA(tiny_model, decay=0.995)
    ema.update()  # warm: the first call may do one-time work

    def refuse(*args, **kwargs):
        raise AssertionError("the EMA update read a device value (a host sync)")

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    calls = []
    original = torch._foreach_lerp_

    def counting(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting)
    for _ in range(3):
        ema.update()
    monkeypatch.undo()
    n_params = len(list(tiny_model.parameters()))
    assert calls == [n_params] * 3  # one multi-tensor call per step over every parameter
    assert ema.updates == 4 and isinstance(ema.updates, int)


def test_average_stays_fp32_for_a_bf16_model() -> None:
    torch.manual_seed(0)
    model = TinyCNN().to(torch.bfloat16)
    ema = EMA(model, decay=0.5)
    assert all(a.dtype == torch.float32 for a in ema.averaged)
    start = [a.double().clone() for a in ema.averaged]
    g = torch.Generator().manual_seed(2)
    _perturb(model, g)
    ema.update()
    for a, s, p in zip(ema.averaged, start, model.parameters(), strict=True):
        assert a.dtype == torch.float32
        assert torch.allclose(a.double(), 0.1 * s + 0.9 * p.double(), atol=1e-6)
    with ema.applied():  # the bf16 model runs on the (rounded) average; its own weights come back
        assert all(torch.equal(p, a.to(p.dtype)) for p, a in zip(model.parameters(), ema.averaged))


def test_applied_swaps_the_average_in_and_restores_the_trained_weights_exactly(tiny_model) -> None:
    ema = EMA(tiny_model, decay=0.5)
    _perturb(tiny_model, torch.Generator().manual_seed(5))
    ema.update()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"), ema.applied():
        for p, a in zip(tiny_model.parameters(), ema.averaged, strict=True):
            assert torch.equal(p, a)
        raise RuntimeError("inside")
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_round_trip_and_refusal_of_another_model(tiny_model) -> None:
    ema = EMA(tiny_model, decay=0.9)
    for _ in range(3):
        _perturb(tiny_model, torch.Generator().manual_seed(7))
        ema.update()
    state = ema.state_dict()
    torch.manual_seed(1)
    other = EMA(TinyCNN(), decay=0.9)
    other.load_state_dict(state)
    assert other.updates == 3 and other.current_decay() == ema.current_decay()
    assert all(torch.equal(a, b) for a, b in zip(ema.averaged, other.averaged))
    with pytest.raises(CheckpointError, match="do not fit this model"):
        EMA(TinyCNN(channels=4), decay=0.9, buffers="average").load_state_dict(state)


def test_checkpoint_weights_rules(tiny_model) -> None:
    trained = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ema = EMA(tiny_model, decay=0.5)
    ema.averaged = [a + 1 for a in ema.averaged]
    best = {"model": trained, "ema": ema.state_dict(), "eval_weights": "ema"}
    last = {"model": trained, "ema": ema.state_dict(), "eval_weights": "trained"}
    ema_pt = {"model": ema.weights(), "weights": "ema", "eval_weights": "ema"}
    plain = {"model": trained}
    sd, which = checkpoint_weights(best)
    assert which == "ema" and torch.equal(sd["conv.weight"], trained["conv.weight"] + 1)
    assert torch.equal(sd["bn.running_mean"], trained["bn.running_mean"])  # buffers: copied
    assert checkpoint_weights(last)[1] == "trained" and checkpoint_weights(plain)[1] == "trained"
    assert checkpoint_weights(ema_pt)[1] == "ema"
    assert checkpoint_weights(last, "ema")[1] == "ema" and checkpoint_weights(best, "trained")[1] == "trained"
    with pytest.raises(CheckpointError, match="no averaged weights"):
        checkpoint_weights(plain, "ema", "x.pt")
    with pytest.raises(CheckpointError, match="only the averaged"):
        checkpoint_weights(ema_pt, "trained", "ema.pt")


# ----------------------------------------------------------------------------- training runs

FAST = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval=quick", "eval.n_examples=8",
    "eval.sanity.enabled=false", "dataset.train_limit=64", "trainer.batch_size=16",
    "trainer.max_batches=null", "trainer.validation.pgd_steps=1", "trainer.validation.max_examples=16",
    "defense.attack.steps=2",
]  # fmt: skip
EMA_ON = ["ema.enabled=true", "ema.decay=0.9"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two-epoch runs with weight averaging (straight, and 1 epoch + resume + 1) and without."""
    CONF = Path(__file__).resolve().parents[2] / "robust_train" / "conf"
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from robust_train.hydra_ext import install

    def compose(overrides):
        install()
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)

    root = tmp_path_factory.mktemp("ema")
    dirs = {name: root / name for name in ("ema", "split", "plain")}
    train_run(compose([*FAST, *EMA_ON, "trainer.epochs=2"]), dirs["ema"])
    train_run(compose([*FAST, *EMA_ON, "trainer.epochs=1"]), dirs["split"])
    train_run(compose([*FAST, *EMA_ON, "trainer.epochs=2"]), dirs["split"])
    train_run(compose([*FAST, "trainer.epochs=2"]), dirs["plain"])
    return dirs


def test_disabled_run_is_unchanged_and_ema_leaves_the_trained_weights_alone(runs) -> None:
    plain = load_checkpoint(runs["plain"] / "last.pt")
    with_ema = load_checkpoint(runs["ema"] / "last.pt")
    # Off: no trace of weight averaging in checkpoints or files.
    assert "ema" not in plain and "eval_weights" not in plain and not (runs["plain"] / "ema.pt").exists()
    assert not (set(with_ema) - set(plain)) - {"ema", "eval_weights"}
    # On: the average takes no random numbers and no training forwards, so the trained weights, the
    # losses and every RNG state are bit-identical to the run without it.
    for k in plain["model"]:
        assert torch.equal(plain["model"][k], with_ema["model"][k]), k
    assert [h["train/loss"] for h in plain["history"]] == [h["train/loss"] for h in with_ema["history"]]
    assert torch.equal(plain["rng"]["torch"], with_ema["rng"]["torch"])
    assert torch.equal(plain["data_generator"], with_ema["data_generator"])
    results = json.loads((runs["plain"] / "results.json").read_text())
    assert [k for k in results["eval"] if k in ("best", "last", "ema")] == ["best", "last"]
    assert all(results["eval"][k]["weights"] == "trained" for k in ("best", "last"))


def test_resume_gives_bit_identical_averages(runs) -> None:
    a, b = (load_checkpoint(runs[d] / "last.pt") for d in ("ema", "split"))
    assert a["epoch"] == b["epoch"] == 2 and a["ema"]["updates"] == b["ema"]["updates"] == 8
    for k, v in a["ema"]["tensors"].items():
        assert torch.equal(v, b["ema"]["tensors"][k]), k
        assert v.dtype == torch.float32
    ea, eb = (load_checkpoint(runs[d] / "ema.pt")["model"] for d in ("ema", "split"))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    assert a["history"][1]["val/robust_acc"] == b["history"][1]["val/robust_acc"]


def test_validation_best_and_final_evaluation_use_the_average(runs) -> None:
    last = load_checkpoint(runs["ema"] / "last.pt")
    best = load_checkpoint(runs["ema"] / "best.pt")
    ema_pt = load_checkpoint(runs["ema"] / "ema.pt")
    assert best["eval_weights"] == "ema" and last["eval_weights"] == "trained"
    assert ema_pt["weights"] == "ema" and ema_pt["epoch"] == 2 and "optimizer" not in ema_pt
    for k, v in last["ema"]["tensors"].items():
        assert torch.equal(ema_pt["model"][k], v), k  # ema.pt: the average at the end
        assert not torch.equal(v, last["model"][k]) or k.endswith("num_batches_tracked")
    results = json.loads((runs["ema"] / "results.json").read_text())
    ev = results["eval"]
    assert {k: ev[k]["weights"] for k in ("best", "last", "ema")} == {
        "best": "ema", "last": "trained", "ema": "ema",
    }  # fmt: skip
    assert ev["ema"]["checkpoint"].endswith("ema.pt")
    # The best epoch here is the last one: best.pt's average is ema.pt's, evaluated once; last.pt of
    # the same epoch holds other weights and is evaluated on its own.
    assert best["epoch"] == 2 and ev["ema"]["same_as"] == "best" and "same_as" not in ev["last"]
    table = format_table(ev)
    assert "| best (ema) |" in table and "|        ema |" in table and "|       last |" in table


def test_validation_runs_on_the_averaged_weights(compose, tmp_path, monkeypatch, capsys) -> None:
    import robust_train.training.trainer as trainer_module

    seen: list[torch.Tensor] = []
    real = trainer_module.evaluate_accuracy

    def spy(model, attack, x, y, batch_size):
        seen.append(next(model.parameters()).detach().clone())
        return real(model, attack, x, y, batch_size)

    monkeypatch.setattr(trainer_module, "evaluate_accuracy", spy)
    train_run(compose([*FAST, *EMA_ON, "trainer.epochs=1"]), tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    name = next(iter(state["ema"]["tensors"]))
    assert len(seen) == 2  # clean and PGD, both on the average
    for weights in seen:
        assert torch.equal(weights, state["ema"]["tensors"][name])
        assert not torch.equal(weights, state["model"][name])
    assert "val(ema) clean" in capsys.readouterr().out


def test_robust_eval_of_ema_pt_and_of_the_average_inside_a_checkpoint(
    runs, compose, tmp_path, monkeypatch
) -> None:
    import robust_train.commands.evaluate as evaluate_module

    evaluated: list[dict] = []
    real = evaluate_module.evaluate_model

    def spy(setup, model, *args, **kwargs):
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(setup, model, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate_model", spy)

    def evaluate(checkpoint: Path, *extra: str) -> tuple[dict, dict]:
        cfg = compose(
            [f"checkpoint={checkpoint}", "logger=none", "eval.n_examples=8", "eval.sanity.enabled=false",
             *extra],
            config_name="evaluate",
        )  # fmt: skip
        res = evaluate_checkpoint(cfg, tmp_path / checkpoint.stem / "-".join(extra), overrides=[])
        return res["eval"][checkpoint.stem], evaluated[-1]

    last = load_checkpoint(runs["ema"] / "last.pt")
    average = {**last["model"], **last["ema"]["tensors"]}

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k].to(a[k].dtype)) for k in b)

    trained = json.loads((runs["ema"] / "results.json").read_text())["eval"]
    entry, weights = evaluate(runs["ema"] / "ema.pt")
    assert entry["weights"] == "ema" and same(weights, average)
    assert entry["attacks"]["clean"]["accuracy"] == trained["ema"]["attacks"]["clean"]["accuracy"]
    entry, weights = evaluate(runs["ema"] / "last.pt", "weights=ema")  # the average inside last.pt
    assert entry["weights"] == "ema" and same(weights, average)
    entry, weights = evaluate(runs["ema"] / "last.pt")
    assert entry["weights"] == "trained" and same(weights, last["model"])
    best = load_checkpoint(runs["ema"] / "best.pt")
    entry, weights = evaluate(runs["ema"] / "best.pt")
    assert entry["weights"] == "ema" and same(weights, best["ema"]["tensors"])
    with pytest.raises(CheckpointError, match="no averaged weights"):
        evaluate(runs["plain"] / "last.pt", "weights=ema")


def test_robust_overfitting_compares_best_average_with_last_trained(runs, compose, tmp_path) -> None:
    cfg = compose(
        [f"checkpoint={runs['ema'] / 'best.pt'}", "logger=none", "eval.n_examples=8",
         "eval.sanity.enabled=false", "analysis=[robust_overfitting]"],
        config_name="evaluate",
    )  # fmt: skip
    ev = evaluate_checkpoint(cfg, tmp_path / "gap", overrides=[])["eval"]
    # Same epoch, other weights: last.pt (trained) is evaluated, not taken as a copy of best (average).
    assert ev["best"]["weights"] == "ema" and ev["last"]["weights"] == "trained"
    assert ev["best"]["epoch"] == ev["last"]["epoch"] and "same_as" not in ev["last"]
    assert set(ev["gap"]) == {"clean", "pgd20"}


def test_start_in_a_run_and_switching_the_average_on_or_off_at_resume(compose, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    train_run(compose([*FAST, "trainer.epochs=1"]), run)  # without an average
    train_run(compose([*FAST, *EMA_ON, "ema.start=0.25", "trainer.epochs=2"]), run)
    assert "the EMA starts from its weights" in capsys.readouterr().out
    state = load_checkpoint(run / "last.pt")
    # 64 images / 16 = 4 steps per epoch, 8 in the run: the first 2 copy; epoch 2's 4 steps were taken.
    assert state["ema"]["copy_until"] == 2 and state["ema"]["updates"] == 4
    train_run(compose([*FAST, "trainer.epochs=3"]), run)
    assert "averaged weights are not kept" in capsys.readouterr().out
    assert "ema" not in load_checkpoint(run / "last.pt")


def test_report_and_wandb_show_the_ema_kind(runs, tmp_path) -> None:
    report = build_report(load_local_runs([runs["ema"]]), tmp_path / "report", plots=False)
    accuracy = report.markdown.split("## Accuracy per attack")[1].split("\n## ")[0]
    rows = [line for line in accuracy.splitlines() if line.startswith("| pgd_at |")]
    assert [r.split(" | ")[1] for r in rows] == ["best (ema)", "last", "ema"]

    class Capture(Tracker):
        def __init__(self) -> None:
            self.values: dict = {}

        def summary(self, values: dict) -> None:
            self.values.update(values)

    tracker = Capture()
    results = json.loads((runs["ema"] / "results.json").read_text())
    log_evaluation(tracker, results["eval"])
    assert tracker.values["eval/ema/clean"] == results["eval"]["ema"]["attacks"]["clean"]["accuracy"]
    assert tracker.values["eval_weights/best"] == "ema" and tracker.values["eval_weights/last"] == "trained"

    class FakeRun:
        id, name, state = "r1", "run", "finished"
        config = results["config"]
        summary = tracker.values

        def scan_history(self, keys=None):
            return []

    record = _wandb_record(FakeRun())
    assert set(record.checkpoints) == {"best", "last", "ema"}
    assert record.checkpoints["best"]["weights"] == "ema"


def test_config_rules() -> None:
    from omegaconf import OmegaConf

    from robust_train.schema import validate_node
    from robust_train.training.ema import EMAConfig

    base = {"eval": {"checkpoints": ["best", "ema"], "attacks": {"clean": {"name": "clean"}}}}
    problems = check_run(OmegaConf.create(base))
    assert any("eval.checkpoints lists `ema` but ema.enabled=false" in p for p in problems)
    with pytest.raises(Exception, match=r"ema.decay=1.0? is out of range"):
        validate_node(EMAConfig, {"decay": 1.0}, "ema")
    with pytest.raises(Exception, match="did you mean `ema.decay`"):
        validate_node(EMAConfig, {"decya": 0.9}, "ema")
    with pytest.raises(Exception, match="ema.buffers"):
        validate_node(EMAConfig, {"buffers": "mean"}, "ema")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_update_never_syncs_and_stays_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = TinyCNN().cuda().to(memory_format=torch.channels_last)
    ema = EMA(model, decay=0.995)
    x = torch.rand(8, 3, 32, 32, device="cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(a.dtype == torch.float32 and a.is_cuda for a in ema.averaged) and ema.updates == 3
