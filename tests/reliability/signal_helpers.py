"""Shared by the stop-signal tests: a tiny resumable run, real signals sent from inside a training step,
and a SIGINT that reaches the process even when the suite runs as a background job."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from robust_train.training.step import TrainStep

FAST = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval.checkpoints=[last]", "eval=quick",
    "eval.n_examples=8", "dataset.train_limit=96", "trainer.batch_size=16", "trainer.max_batches=null",
    "trainer.epochs=2", "trainer.validation.pgd_steps=1", "trainer.validation.max_examples=16",
    "defense.attack.steps=2", "eval.sanity.enabled=false",
]  # fmt: skip
STEPS_PER_EPOCH = 6  # 96 images / 16


@pytest.fixture(autouse=True)
def ctrl_c_deliverable() -> Iterator[None]:
    """Python's own SIGINT handler, as in a terminal, even when the suite runs as a background job whose
    shell ignores SIGINT (the trainer then rightly leaves it ignored, and the SIGINT cases could not
    run); children get SIG_DFL at exec."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def signal_in_step(
    monkeypatch: pytest.MonkeyPatch, step: int, sig: signal.Signals = signal.SIGTERM, times: int = 1
) -> list[int]:
    """Send `sig` (`times` times) to this process from inside the `step`-th training step; returns the
    step counter."""
    calls = [0]
    original = TrainStep.__call__

    def counting(self, x, y):
        out = original(self, x, y)
        calls[0] += 1
        if calls[0] == step:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return out

    monkeypatch.setattr(TrainStep, "__call__", counting)
    return calls
