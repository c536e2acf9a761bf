"""Stop signals: checkpoint at the next step boundary, exact mid-epoch resume, handler chaining.

Ctrl-C's own behaviour (exit 130, a second Ctrl-C at once, the console script) is in test_sigint.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from signal_helpers import FAST, STEPS_PER_EPOCH, ctrl_c_deliverable, signal_in_step  # noqa: F401

from robust_train.commands.train import train_run
from robust_train.tracking.checkpoint import load_checkpoint
from robust_train.training.signals import EXIT_INTERRUPTED, EXIT_SIGINT, StopSignals, TrainingInterrupted


def _signal_after(monkeypatch, steps: int, sig: signal.Signals = signal.SIGTERM) -> list[int]:
    return signal_in_step(monkeypatch, steps, sig)


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    "addons,stop_at,sig",
    [
        ([], 3, signal.SIGTERM),
        ([], 3, signal.SIGINT),  # Ctrl-C: the same checkpoint and resume, exit code 130
        (["addons=[iseat]", "addons.iseat.warm_start_epochs=0"], 8, signal.SIGTERM),
        (["ema.enabled=true"], 8, signal.SIGTERM),
    ],
    ids=["plain", "plain-sigint", "iseat", "ema"],
)
def test_signal_mid_epoch_then_resume_matches_straight_run(
    compose, tmp_path, monkeypatch, addons, stop_at, sig
):
    cfg = compose([*FAST, *addons])
    train_run(cfg, tmp_path / "straight")

    before = signal.getsignal(sig)
    calls = _signal_after(monkeypatch, stop_at, sig)
    try:
        train_run(compose([*FAST, *addons]), tmp_path / "split")
    except TrainingInterrupted as err:
        stop = err
    except KeyboardInterrupt:  # caught here: escaping, it would end the whole pytest session
        pytest.fail(f"{sig.name} raised KeyboardInterrupt instead of a checkpoint and a clean stop")
    else:
        pytest.fail("training was not stopped")
    code = EXIT_SIGINT if sig == signal.SIGINT else EXIT_INTERRUPTED
    assert stop.code == code and f"stopped by {sig.name}" in str(stop)
    state = load_checkpoint(tmp_path / "split" / "last.pt")
    # 96 images / 16 = 6 steps per epoch: stop_at=3 is inside epoch 1, 8 inside epoch 2.
    mid = state["mid_epoch"]
    assert (
        mid is not None and mid["epoch"] == (stop_at - 1) // 6 and mid["next_batch"] == (stop_at - 1) % 6 + 1
    )
    assert calls[0] == stop_at  # stopped at the boundary right after the signalled step
    assert signal.getsignal(sig) is before  # handlers restored
    monkeypatch.undo()

    res = train_run(compose([*FAST, *addons]), tmp_path / "split")
    assert res["train"]["epochs_completed"] == 2
    _same_weights(tmp_path / "straight" / "last.pt", tmp_path / "split" / "last.pt")
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("straight", "split"))
    assert [h["train/loss"] for h in a["history"]] == [h["train/loss"] for h in b["history"]]
    assert b["mid_epoch"] is None
    if "ema" in a:  # weight averaging: the average and its warm-up counter resume exactly too
        assert a["ema"]["updates"] == b["ema"]["updates"] == 12
        for k, v in a["ema"]["tensors"].items():
            assert torch.equal(v, b["ema"]["tensors"][k]), k


def test_previous_python_handler_is_chained(compose, tmp_path, monkeypatch) -> None:
    seen: list[int] = []

    def launcher_handler(signum, frame):  # what submitit's requeue handler looks like to us
        seen.append(signum)

    previous = signal.signal(signal.SIGUSR1, launcher_handler)
    try:
        _signal_after(monkeypatch, 2, signal.SIGUSR1)
        with pytest.raises(TrainingInterrupted):
            train_run(compose([*FAST, "trainer.epochs=1"]), tmp_path / "run")
        assert seen == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is launcher_handler  # put back after training
        assert load_checkpoint(tmp_path / "run" / "last.pt")["mid_epoch"]["next_batch"] == 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_stop_signals_parse_and_refuse_uncatchable() -> None:
    from robust_train.errors import ConfigError

    with StopSignals(["TERM", "SIGUSR2"]) as s:
        assert [x.name for x in s.signals] == ["SIGTERM", "SIGUSR2", "SIGINT"]  # Ctrl-C always
        os.kill(os.getpid(), signal.SIGUSR2)
        assert s.requested == signal.SIGUSR2
    with pytest.raises(ConfigError, match="SIGKILL"):
        StopSignals(["SIGKILL"])
    with pytest.raises(ConfigError, match="trainer.stop_signals"):
        StopSignals(["SIGBOGUS"])


def test_a_sweep_job_stopped_by_a_signal_says_to_rerun_the_sweep(cli, tmp_path, monkeypatch) -> None:
    from robust_train.cli import train_main

    signal_in_step(monkeypatch, 2, signal.SIGTERM)
    sweep = tmp_path / "sweep"
    code, text = cli(train_main, "robust-train", ["-m", *FAST, "seed=0,1", f"hydra.sweep.dir={sweep}"])
    assert code == EXIT_INTERRUPTED
    assert f"Rerun the sweep's command with hydra.sweep.dir={sweep} to resume" in text
    assert "hydra.run.dir" not in text
