"""Ctrl-C (SIGINT) during training: a checkpoint at the next step boundary and exit 130, like SIGTERM's
75; a second Ctrl-C stops at once, and interrupting the checkpoint write leaves a resumable run.

The signals are real (os.kill on this process from inside a training step). The mid-epoch resume of a
Ctrl-C'd run matching a straight run is test_signals.py's plain-sigint case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from signal_helpers import FAST, STEPS_PER_EPOCH, ctrl_c_deliverable, signal_in_step  # noqa: F401

from robust_train.commands.train import train_run
from robust_train.tracking.checkpoint import load_checkpoint, previous_path, verify_checkpoint
from robust_train.training.signals import EXIT_SIGINT, StopSignals, TrainingInterrupted


def _sigint_in_step(monkeypatch: pytest.MonkeyPatch, step: int, times: int = 1) -> list[int]:
    return signal_in_step(monkeypatch, step, signal.SIGINT, times)


def _stopped(run: Callable[[], object]) -> TrainingInterrupted:
    """The clean stop `run()` ends in; a KeyboardInterrupt (which would end the whole pytest session)
    is a test failure instead."""
    try:
        run()
    except TrainingInterrupted as err:
        return err
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C raised KeyboardInterrupt instead of writing a checkpoint and stopping cleanly")
    pytest.fail("training was not stopped")


def _lines(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_ctrl_c_checkpoints_mid_epoch_and_exits_130(compose, tmp_path, monkeypatch, capfd) -> None:
    calls = _sigint_in_step(monkeypatch, 3)
    stop = _stopped(lambda: train_run(compose(FAST), tmp_path / "run"))
    assert stop.code == EXIT_SIGINT == 130
    assert calls[0] == 3  # stopped at the boundary right after the signalled step
    mid = load_checkpoint(tmp_path / "run" / "last.pt")["mid_epoch"]
    assert mid["epoch"] == 0 and mid["next_batch"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after training

    err = capfd.readouterr().err
    assert "Traceback" not in err
    (received,) = _lines(err, "received SIGINT")
    assert received == (
        "received SIGINT: writing a checkpoint at the next step boundary (Ctrl-C again to stop at once)"
    )
    (stopped,) = _lines(err, "stopped by SIGINT")
    assert stopped.startswith("robust-train: stopped by SIGINT at epoch 1, step 3; checkpoint ")
    assert str(tmp_path / "run" / "last.pt") in stopped and f"hydra.run.dir={tmp_path / 'run'}" in stopped
    assert stopped.endswith("(exit code 130).") and str(stop) == stopped


def test_ctrl_c_handled_whatever_stop_signals_lists(compose, tmp_path, monkeypatch) -> None:
    # trainer.stop_signals names the scheduler's signals; setting it must not cost a clean Ctrl-C.
    _sigint_in_step(monkeypatch, 2)
    cfg = compose([*FAST, "trainer.epochs=1", "trainer.stop_signals=[SIGUSR1]"])
    assert _stopped(lambda: train_run(cfg, tmp_path / "run")).code == EXIT_SIGINT
    assert load_checkpoint(tmp_path / "run" / "last.pt")["mid_epoch"]["next_batch"] == 2


def test_ctrl_c_is_not_chained_to_the_previous_python_handler(compose, tmp_path, monkeypatch) -> None:
    # Unlike a scheduler's handler (submitit), an earlier SIGINT handler is Python's KeyboardInterrupt
    # or something like it: calling it after the checkpoint would turn a clean stop into a crash.
    seen: list[int] = []

    def earlier(signum, frame):
        seen.append(signum)

    signal.signal(signal.SIGINT, earlier)
    _sigint_in_step(monkeypatch, 2)
    stop = _stopped(lambda: train_run(compose([*FAST, "trainer.epochs=1"]), tmp_path / "run"))
    assert stop.code == EXIT_SIGINT and seen == []
    assert signal.getsignal(signal.SIGINT) is earlier


def test_second_ctrl_c_stops_at_once(compose, tmp_path, monkeypatch, capfd) -> None:
    # Both inside step 8 (epoch 2, step 2): the second raises before the step boundary is reached.
    calls = _sigint_in_step(monkeypatch, STEPS_PER_EPOCH + 2, times=2)
    with pytest.raises(KeyboardInterrupt):
        train_run(compose(FAST), tmp_path / "run")
    assert calls[0] == STEPS_PER_EPOCH + 2
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and state["mid_epoch"] is None  # epoch 1's: no mid-epoch checkpoint
    assert verify_checkpoint(tmp_path / "run" / "last.pt") is True
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after training
    err = capfd.readouterr().err
    assert len(_lines(err, "received SIGINT")) == 1 and "stopped by" not in err and "Traceback" not in err


def test_ctrl_c_after_a_pending_sigterm_says_so_and_stops_on_the_next(capfd) -> None:
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only reports: the stop is already due
        except KeyboardInterrupt:
            pytest.fail("the first Ctrl-C raised KeyboardInterrupt")
        assert s.requested == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    err = capfd.readouterr().err
    assert len(_lines(err, "received SIGTERM")) == 1
    assert len(_lines(err, "received SIGINT")) == 1 and "Ctrl-C again to stop at once" in err


def test_ignored_sigint_stays_ignored() -> None:
    # A background job of a non-interactive shell ignores SIGINT: Ctrl-C at the terminal is not for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with StopSignals() as s:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
        assert s.requested is None
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.parametrize("during", ["torch.save", "rename"])
def test_second_ctrl_c_during_the_checkpoint_write_leaves_a_resumable_run(
    compose, tmp_path, monkeypatch, capsys, during
) -> None:
    """The second Ctrl-C lands while the mid-epoch last.pt is written: while the temporary file is
    written, or between moving the old last.pt to last.prev.pt and the new one into place (the worst
    moment: no last.pt at all). Either way the run resumes from the epoch-1 checkpoint and finishes
    with the weights of a straight run."""
    train_run(compose(FAST), tmp_path / "straight")
    run = tmp_path / "split"
    last = run / "last.pt"
    stop_at = STEPS_PER_EPOCH + 2
    calls = _sigint_in_step(monkeypatch, stop_at)
    fired = [False]

    def second_ctrl_c() -> None:
        if calls[0] >= stop_at and not fired[0]:
            fired[0] = True
            os.kill(os.getpid(), signal.SIGINT)

    if during == "torch.save":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            second_ctrl_c()
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst) == last:
                second_ctrl_c()
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)

    with pytest.raises(KeyboardInterrupt):
        train_run(compose(FAST), run)
    assert fired[0]
    if during == "torch.save":
        assert verify_checkpoint(last) is True and load_checkpoint(last)["mid_epoch"] is None
        assert not list(run.glob(".last.pt.*.tmp"))  # the half-written temporary is removed
    else:
        assert not last.exists()
        prev = previous_path(last)
        assert verify_checkpoint(prev) is True
        assert load_checkpoint(prev)["epoch"] == 1 and load_checkpoint(prev)["mid_epoch"] is None
    monkeypatch.undo()

    if during == "rename":
        capsys.readouterr()
        with pytest.warns(RuntimeWarning, match="using the previous checkpoint") as caught:
            res = train_run(compose(FAST), run)
        # One warning, and the console names the file the run really continued from.
        assert len([w for w in caught if "previous checkpoint" in str(w.message)]) == 1
        out = capsys.readouterr().out
        assert f"resumed from {previous_path(last)} after epoch 1" in out
        assert "previous checkpoint" not in out  # the warning is not printed a second time
    else:
        res = train_run(compose(FAST), run)
    assert res["train"]["epochs_completed"] == 2
    _same_weights(tmp_path / "straight" / "last.pt", last)
    assert not list(run.glob(".last.pt*.tmp"))  # strays of the interrupted write are cleaned up


def test_ctrl_c_after_the_last_epoch_is_not_lost(compose, tmp_path, monkeypatch) -> None:
    # Caught while ema.pt is written after the last epoch: training is done, yet the user asked to stop,
    # so the run exits (130) instead of going on to evaluate; a rerun only evaluates.
    from robust_train.training.trainer import Trainer

    real = Trainer.save_ema

    def save_ema(self):
        os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Trainer, "save_ema", save_ema)
    cfg = [*FAST, "trainer.epochs=1", "ema.enabled=true"]
    stop = _stopped(lambda: train_run(compose(cfg), tmp_path / "run"))
    assert stop.code == EXIT_SIGINT and "the end of epoch 1" in str(stop)
    assert (tmp_path / "run" / "ema.pt").exists()
    monkeypatch.undo()
    res = train_run(compose(cfg), tmp_path / "run")
    assert res["train"]["epochs_completed"] == 1 and "last" in res["eval"]


REPO = Path(__file__).resolve().parents[2]
ARGS = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval.checkpoints=[last]", "eval=quick",
    "eval.n_examples=8", "dataset.train_limit=192", "trainer.batch_size=32", "trainer.max_batches=null",
    "trainer.validation.max_examples=16", "trainer.validation.pgd_steps=1", "defense.attack.steps=2",
    "trainer.epochs=2", "trainer.log_every=1", "eval.sanity.enabled=false",
]  # fmt: skip


def test_console_script_ctrl_c_checkpoints_and_exits_130(tmp_path: Path) -> None:
    """The real command: one Ctrl-C gives a checkpoint, two lines instead of a traceback, and 130."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "robust-train"), *ARGS, f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # results.json is written after epoch 1's checkpoints, just before epoch 2's first step.
        end = time.monotonic() + 240
        while not (run_dir / "results.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "epoch 1 did not finish in time"
            time.sleep(0.05)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_SIGINT, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert len(_lines(err, "received SIGINT")) == 1 and len(_lines(err, "stopped by SIGINT")) == 1
    assert verify_checkpoint(run_dir / "last.pt") is True
    state = load_checkpoint(run_dir / "last.pt")
    if state["mid_epoch"] is not None:  # the usual case: caught inside epoch 2
        assert state["mid_epoch"]["epoch"] == 1 and 1 <= state["mid_epoch"]["next_batch"] <= 6
