"""NaN/inf guard: stop naming epoch, step and terms; or skip bad batches up to trainer.nan.max_skips."""

from __future__ import annotations

import pytest
import torch

from robust_train.commands.train import train_run
from robust_train.errors import NumericalError
from robust_train.training.step import TrainStep
from robust_train.training.trainer import NanGuard

FAST = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval.checkpoints=[last]", "eval=quick",
    "eval.n_examples=8", "dataset.train_limit=96", "trainer.batch_size=16", "trainer.max_batches=null",
    "trainer.validation.max_examples=16", "trainer.validation.pgd_steps=1", "defense=standard",
    "eval.sanity.enabled=false", "trainer.log_every=2",
]  # fmt: skip


def _tamper_metrics(monkeypatch, at_step: int, key: str, value: float) -> None:
    original = TrainStep.__call__
    calls = [0]

    def tampered(self, x, y):
        out = original(self, x, y)
        calls[0] += 1
        if calls[0] == at_step:
            out[key] = torch.full_like(out[key], value)
        return out

    monkeypatch.setattr(TrainStep, "__call__", tampered)


def test_nan_loss_stops_with_epoch_step_and_terms(compose, tmp_path, monkeypatch) -> None:
    _tamper_metrics(monkeypatch, 9, "loss", float("nan"))  # epoch 2 (6 steps per epoch), step 3
    with pytest.raises(NumericalError) as err:
        train_run(compose([*FAST, "trainer.epochs=2"]), tmp_path / "run")
    msg = str(err.value)
    assert "non-finite loss at epoch 2, step 3/6" in msg and "loss=nan" in msg and "ce=" in msg
    assert "detected at step 4" in msg  # the next logging interval: no per-step host sync
    from robust_train.tracking.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_exploding_term_stops(compose, tmp_path, monkeypatch) -> None:
    _tamper_metrics(monkeypatch, 2, "ce", 1e9)
    with pytest.raises(NumericalError, match=r"exploding .*max_term=1e\+06.*epoch 1, step 2/6.*ce=1e\+09"):
        train_run(compose([*FAST, "trainer.epochs=1"]), tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()


def _poison_outer_forward(monkeypatch, steps: set[int]) -> dict:
    """Make the real loss NaN on the given steps (through the model output), recording the weights."""
    original = TrainStep.__call__
    seen: dict = {"calls": 0, "before": {}, "after": {}}

    def poisoned(self, x, y):
        seen["calls"] += 1
        step = seen["calls"]
        if step not in steps:
            return original(self, x, y)
        handle = self.model.register_forward_hook(lambda m, i, o: o * float("nan"))
        seen["before"][step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        try:
            return original(self, x, y)
        finally:
            handle.remove()

    monkeypatch.setattr(TrainStep, "__call__", poisoned)
    return seen


def test_skip_policy_skips_and_restores_weights(compose, tmp_path, monkeypatch, capsys) -> None:
    _poison_outer_forward(monkeypatch, {2, 5})
    res = train_run(
        compose([*FAST, "trainer.epochs=1", "trainer.nan.policy=skip", "trainer.nan.max_skips=2"]),
        tmp_path / "r",
    )
    out = capsys.readouterr().out
    assert "skipped the batch at epoch 1, step 2/6" in out and "2/2 skips used" in out
    assert res["train"]["history"][0]["train/loss"] == res["train"]["history"][0]["train/loss"]  # finite mean
    from robust_train.tracking.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "r" / "last.pt")
    assert [s["step"] for s in state["skipped_steps"]] == [2, 5]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_skipped_step_leaves_weights_and_bn_untouched(compose, tmp_path, monkeypatch) -> None:
    from robust_train.training import trainer as trainer_mod

    seen = _poison_outer_forward(monkeypatch, {3})
    after: dict = {}
    original_skip = trainer_mod.Trainer._skip_step

    def record(self, epoch, i, n, metrics):
        after.update({k: v.clone() for k, v in self.model.state_dict().items()})
        return original_skip(self, epoch, i, n, metrics)

    monkeypatch.setattr(trainer_mod.Trainer, "_skip_step", record)
    train_run(
        compose([*FAST, "trainer.epochs=1", "trainer.nan.policy=skip", "trainer.nan.max_skips=1"]),
        tmp_path / "r",
    )
    before = seen["before"][3]
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_skip_policy_stops_after_max_skips(compose, tmp_path, monkeypatch) -> None:
    _poison_outer_forward(monkeypatch, {2, 3})
    with pytest.raises(NumericalError, match=r"epoch 1, step 3/6 .*max_skips=1"):
        train_run(
            compose([*FAST, "trainer.epochs=1", "trainer.nan.policy=skip", "trainer.nan.max_skips=1"]),
            tmp_path / "r",
        )


def test_guard_has_no_host_sync_until_check() -> None:
    guard = NanGuard(torch.device("cpu"), 1e6)
    for step in range(5):
        value = float("inf") if step == 3 else 1.0
        guard.update({"loss": torch.tensor(value), "correct": torch.tensor(1), "kl": torch.tensor(0.5)}, step)
    assert guard.keys == ["loss", "kl"]  # 'correct' is a count, not a loss term
    with pytest.raises(NumericalError, match=r"epoch 7, step 4/9 \(loss=inf, kl=0.5\); detected at step 5"):
        guard.check(6, 9, 4)
