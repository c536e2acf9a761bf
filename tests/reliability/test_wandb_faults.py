"""W&B erroring mid-run: training goes on, local results are complete, one warning is printed."""

from __future__ import annotations

import json

import pytest
import wandb

FAST = [
    "debug=fast", "logger=wandb", "trainer.progress=false", "eval.checkpoints=[last]", "eval=quick",
    "eval.n_examples=8", "dataset.train_limit=48", "trainer.batch_size=16", "trainer.max_batches=null",
    "trainer.validation.max_examples=16", "trainer.validation.pgd_steps=1", "defense=standard",
    "eval.sanity.n_examples=8", "eval.sanity.pgd_steps=2", "eval.sanity.square_queries=20",
    "trainer.epochs=2",
]  # fmt: skip


class _DyingRun:
    """A W&B run that works for the first epoch, then every call raises (network gone, server 500)."""

    id = "dying1"

    def __init__(self) -> None:
        self.logged: list[dict] = []
        self.summary = self
        self.finished: list[int] = []

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def log(self, metrics, step=None) -> None:
        if self.logged:
            raise ConnectionError("wandb.ai: 500 Internal Server Error")
        self.logged.append(metrics)

    def __setitem__(self, key, value) -> None:
        raise ConnectionError("wandb.ai unreachable")

    def finish(self, exit_code: int = 0) -> None:
        self.finished.append(exit_code)


def test_wandb_dying_mid_run_does_not_stop_training(compose, tmp_path, monkeypatch) -> None:
    from robust_train.commands.train import train_run

    run = _DyingRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    with pytest.warns(
        RuntimeWarning, match="W&B disabled after an error .*(500 Internal Server Error|unreachable)"
    ):
        res = train_run(compose(FAST), tmp_path / "run")
    assert len(run.logged) == 1 and run.logged[0]["epoch"] == 1  # epoch 2 failed, and nothing after it
    local = json.loads((tmp_path / "run" / "results.json").read_text())
    assert local["train"]["epochs_completed"] == 2 and len(local["train"]["history"]) == 2
    assert local["eval"]["last"]["attacks"]["pgd20"]["n"] == 8
    assert "sanity" in local["eval"]["last"] and res["wandb"]["run_id"] == "dying1"
