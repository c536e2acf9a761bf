"""W&B never stops training: failures at init or mid-run become one warning; runs get the right metadata."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wandb

from robust_train.commands.train import train_run
from robust_train.tracking.wandb_run import Tracker, WandbTracker, build_tracker

FAST = ["debug=fast", "trainer.progress=false", "eval.checkpoints=[last]", "trainer.validation.pgd_steps=1"]


def test_logger_none_and_disabled_give_the_no_op_tracker(tmp_path: Path) -> None:
    assert type(build_tracker({"name": "none"}, tmp_path, {}, "x")) is Tracker
    assert type(build_tracker({"name": "wandb", "mode": "disabled"}, tmp_path, {}, "x")) is Tracker


def test_init_failure_warns_and_training_completes(compose, tmp_path: Path, monkeypatch) -> None:
    def broken_init(**kwargs):
        raise ConnectionError("wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match="W&B disabled"):
        res = train_run(compose([*FAST, "logger=wandb"]), tmp_path / "run")
    assert res["eval"]["last"]["attacks"]["clean"]["n"] == 64
    assert json.loads((tmp_path / "run" / "results.json").read_text())["train"]["epochs_completed"] == 1


class _FlakyRun:
    """A wandb run whose log() fails on the first call."""

    id = "flaky1"

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.summary: dict = {}

    def define_metric(self, *args, **kwargs) -> None:
        self.calls.append("define_metric")

    def log(self, metrics, step=None) -> None:
        raise OSError("disk quota exceeded in wandb dir")

    def finish(self, exit_code: int = 0) -> None:
        self.calls.append(f"finish:{exit_code}")


def test_mid_run_failure_warns_once_and_stops_logging(tmp_path: Path, monkeypatch) -> None:
    run = _FlakyRun()
    captured: dict = {}

    def fake_init(**kwargs):
        captured.update(kwargs)
        return run

    monkeypatch.setattr(wandb, "init", fake_init)
    tracker = WandbTracker(
        {"mode": "offline", "project": "p", "tags": ["extra"]}, tmp_path, {"a": 1}, "name", "sweep-7",
        ["dataset:mnist5k"], None,
    )  # fmt: skip
    assert captured["group"] == "sweep-7" and captured["mode"] == "offline"
    assert captured["tags"] == ["extra", "dataset:mnist5k"] and captured["config"] == {"a": 1}
    with pytest.warns(RuntimeWarning, match="disk quota"):
        tracker.log({"epoch": 1})
    tracker.log({"epoch": 2})  # disabled now: no second warning, no exception
    tracker.finish(0)
    assert "finish:0" not in run.calls


def test_failed_training_finishes_wandb_run_with_exit_code_1(compose, tmp_path: Path, monkeypatch) -> None:
    run = _FlakyRun()
    run.log = lambda metrics: None  # type: ignore[method-assign]
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)

    def explode(self, epoch):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr("robust_train.training.trainer.Trainer.train_epoch", explode)
    with pytest.raises(RuntimeError, match="illegal memory"):
        train_run(compose([*FAST, "logger=wandb"]), tmp_path / "run")
    assert run.calls[-1] == "finish:1"
