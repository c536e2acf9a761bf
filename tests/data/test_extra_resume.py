"""A run with extra data stopped by SIGTERM mid-epoch resumes bit-identically (plan, reader, RNG).

The same path as tests/reliability/test_signals.py (a real signal sent from inside a training step),
with batches that mix original and memory-mapped extra images read ahead by a background thread.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_train.commands.train import train_run
from robust_train.errors import CheckpointError
from robust_train.tracking.checkpoint import load_checkpoint
from robust_train.training.signals import EXIT_INTERRUPTED, TrainingInterrupted
from robust_train.training.step import TrainStep

FAST = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval.checkpoints=[last]", "eval=quick",
    "eval.n_examples=8", "dataset.train_limit=48", "trainer.batch_size=16", "trainer.max_batches=null",
    "trainer.epochs=2", "trainer.validation.pgd_steps=1", "trainer.validation.max_examples=16",
    "defense.attack.steps=1", "eval.sanity.enabled=false", "dataset.epoch_steps=5",
]  # fmt: skip


def _signal_after(monkeypatch, steps: int) -> list[int]:
    calls = [0]
    original = TrainStep.__call__

    def counting(self, x, y):
        out = original(self, x, y)
        calls[0] += 1
        if calls[0] == steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(TrainStep, "__call__", counting)
    return calls


@pytest.fixture
def extra_files(tmp_path, fmt) -> list[str]:
    fmt.write_extra_npz(tmp_path / "a.npz", 60, seed=1)
    fmt.write_extra_npz(tmp_path / "b.npz", 25, seed=2, label_dtype=np.int32)
    return [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]


@pytest.mark.parametrize("stop_at", [3, 7], ids=["epoch1", "epoch2"])
def test_sigterm_mid_epoch_with_extra_data_resumes_bit_identically(
    compose, tmp_path, monkeypatch, extra_files, stop_at
):
    overrides = [*FAST, f"dataset.extra=[{','.join(extra_files)}]", "defense=trades"]
    train_run(compose(overrides), tmp_path / "straight")

    calls = _signal_after(monkeypatch, stop_at)
    with pytest.raises(TrainingInterrupted) as info:
        train_run(compose(overrides), tmp_path / "split")
    assert info.value.code == EXIT_INTERRUPTED
    assert calls[0] == stop_at
    mid = load_checkpoint(tmp_path / "split" / "last.pt")["mid_epoch"]
    # 5 steps per epoch (dataset.epoch_steps): stop_at=3 is inside epoch 1, 7 inside epoch 2.
    assert mid["epoch"] == (stop_at - 1) // 5 and mid["next_batch"] == (stop_at - 1) % 5 + 1
    assert mid["extra_size"] == 85 and len(mid["extra"]) == 5
    assert all(len(o) + len(e) == 16 for o, e in zip(mid["batches"], mid["extra"]))
    monkeypatch.undo()

    res = train_run(compose(overrides), tmp_path / "split")
    assert res["train"]["epochs_completed"] == 2
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "split"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["train/loss"] for h in a["history"]] == [h["train/loss"] for h in b["history"]]
    assert b["mid_epoch"] is None


def test_resume_with_other_extra_files_is_refused(compose, tmp_path, monkeypatch, extra_files, fmt):
    overrides = [*FAST, f"dataset.extra=[{','.join(extra_files)}]"]
    _signal_after(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted):
        train_run(compose(overrides), tmp_path / "run")
    monkeypatch.undo()
    fewer = [*FAST, f"dataset.extra={extra_files[0]}"]
    with pytest.raises(CheckpointError, match=r"written mid-epoch with 85 extra images.*now gives 60 images"):
        train_run(compose(fewer), tmp_path / "run")


def test_prefetch_depth_does_not_change_results(compose, tmp_path, monkeypatch, extra_files):
    """The reader only follows the plan: reading one batch ahead or eight gives the same weights."""
    import robust_train.data.extra as extra

    overrides = [*FAST, f"dataset.extra=[{','.join(extra_files)}]", "trainer.epochs=1"]
    runs = []
    for depth in (1, 8):
        monkeypatch.setattr(extra, "PREFETCH_DEPTH", depth)
        train_run(compose(overrides), tmp_path / f"d{depth}")
        runs.append(load_checkpoint(tmp_path / f"d{depth}" / "last.pt")["model"])
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


def test_run_dirs_are_independent_of_the_working_directory(compose, tmp_path, monkeypatch, extra_files):
    """Relative extra paths resolve against the working directory, as every other path of a run."""
    monkeypatch.chdir(Path(extra_files[0]).parent)
    res = train_run(compose([*FAST, "dataset.extra=a.npz", "trainer.epochs=1"]), tmp_path / "rel")
    assert res["train"]["epochs_completed"] == 1
