"""The real command killed mid-run: SIGKILL loses at most the current epoch, SIGTERM checkpoints mid-epoch.

Both restart the same command in the same run dir and check that it resumes and finishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robust_train.tracking.checkpoint import load_checkpoint, verify_checkpoint
from robust_train.training.signals import EXIT_INTERRUPTED

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARGS = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval.checkpoints=[last]", "eval=quick",
    "eval.n_examples=8", "dataset.train_limit=192", "trainer.batch_size=32", "trainer.max_batches=null",
    "trainer.validation.max_examples=16", "trainer.validation.pgd_steps=1", "defense.attack.steps=2",
    "trainer.epochs=2", "trainer.log_every=1",
    "eval.sanity.n_examples=8", "eval.sanity.pgd_steps=2", "eval.sanity.square_queries=10",
]  # fmt: skip
ENV = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}


def _start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "robust-train"), *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "no checkpoint in time"
        time.sleep(0.05)


def _finish(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "robust-train"), *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_sigkill_mid_epoch_then_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for(run_dir / "last.pt", proc)
    # Killed right after epoch 1's checkpoint, while epoch 2 starts (it takes far longer than the poll).
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # Whatever the kill interrupted, the newest checkpoint is whole and verified.
    assert verify_checkpoint(run_dir / "last.pt") in (True, None)
    epoch_before = load_checkpoint(run_dir / "last.pt", fallback=True)["epoch"]
    assert epoch_before == 1

    done = _finish(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {run_dir / 'last.pt'} after epoch {epoch_before}" in done.stdout
    res = json.loads((run_dir / "results.json").read_text())
    assert res["train"]["epochs_completed"] == 2
    assert [h["epoch"] for h in res["train"]["history"]] == [1, 2]
    assert res["eval"]["last"]["attacks"]["pgd20"]["n"] == 8 and "sanity" in res["eval"]["last"]


@pytest.mark.slow  # ~20 s; the same path runs in-process with a real signal in test_signals.py
def test_sigterm_checkpoints_mid_epoch_exits_75_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    # results.json is written after epoch 1's checkpoints and log line, just before epoch 2's first step.
    _wait_for(run_dir / "results.json", proc)
    time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    state = load_checkpoint(run_dir / "last.pt")
    assert verify_checkpoint(run_dir / "last.pt") is True
    mid = state["mid_epoch"]
    if mid is not None:  # the usual case: caught inside epoch 2
        assert mid["epoch"] == state["epoch"] and 1 <= mid["next_batch"] <= 6

    done = _finish(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["train"]["epochs_completed"] == 2
    assert load_checkpoint(run_dir / "last.pt")["mid_epoch"] is None
