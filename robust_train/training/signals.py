"""Stop signals: checkpoint at the next step boundary, then chain to the previous handler or exit.

Schedulers announce preemption with a signal (SLURM: SIGTERM, or SIGUSR1/SIGUSR2 with `--signal`;
submitit installs its own SIGUSR2/SIGTERM handler that requeues the job). The handler installed here
only records the signal: writing a checkpoint from inside a signal handler could interrupt a half-done
optimizer step. The trainer polls `requested` (a Python attribute, no device sync) after every step,
writes a mid-epoch `last.pt`, and calls `deliver()`:

- if the handler that was installed before ours is a Python callable (submitit's requeue), it is
  called with the signal, so the launcher's own preemption logic still runs;
- otherwise (or if that handler returns) the process exits with `EXIT_INTERRUPTED` = 75
  (EX_TEMPFAIL, "temporary failure, try again"): not 0, because the run is not finished, and not 1 or
  2, which mean a crash or a user error. Rerunning the same command in the same run dir resumes.

Ctrl-C (SIGINT) is handled the same way whatever `trainer.stop_signals` lists: that setting names the
scheduler's signals, and a user who sets it for their cluster should not lose a clean Ctrl-C. It differs
in three ways:

- the exit code is `EXIT_SIGINT` = 130 (128 + SIGINT, what shells report for a Ctrl-C'd command);
- it is never chained: the handler before ours is normally Python's `default_int_handler`, which would
  raise KeyboardInterrupt (a traceback, a run marked failed) right after the checkpoint;
- a second Ctrl-C does not wait for the step boundary: it raises KeyboardInterrupt at once. Checkpoints
  are written atomically with the previous one kept (tracking/checkpoint.py), so interrupting the write
  leaves a loadable last.pt or last.prev.pt; the steps since the last complete checkpoint are lost.

A SIGINT that is ignored when training starts (`cmd &` in a script: shells without job control start
background commands so) stays ignored: Ctrl-C at the terminal was not meant for this process.

Handlers are installed only in the main thread (Python allows no other) and restored on exit.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import Any

from robust_train.errors import ConfigError

EXIT_INTERRUPTED = 75
EXIT_SIGINT = 128 + int(signal.SIGINT)  # 130
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


def exit_code(sig: signal.Signals | None) -> int:
    """The process exit code after a stop by `sig`: 130 for Ctrl-C (the shell convention), else 75."""
    return EXIT_SIGINT if sig == signal.SIGINT else EXIT_INTERRUPTED


class TrainingInterrupted(SystemExit):
    """Raised after the interrupt checkpoint is written; exits the process with `code` (130 for SIGINT)."""

    def __init__(self, message: str, code: int = EXIT_INTERRUPTED) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def parse_signals(names: Sequence[Any] | None, key: str = "trainer.stop_signals") -> list[signal.Signals]:
    """Signal names (SIGTERM, USR1, ...) as `signal.Signals`; ConfigError naming `key` for unknown ones."""
    out: list[signal.Signals] = []
    for name in names or ():
        text = str(name).upper()
        text = text if text.startswith("SIG") else "SIG" + text
        sig = getattr(signal.Signals, text, None)
        if sig is None or text in ("SIGKILL", "SIGSTOP"):
            allowed = ", ".join(
                s for s in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP") if hasattr(signal, s)
            )
            raise ConfigError(f"{key} contains {name!r}, which cannot be caught here; allowed: {allowed}")
        out.append(sig)
    return out


class StopSignals:
    """While active, the given signals and SIGINT only set `requested`, except that a second SIGINT
    raises KeyboardInterrupt. The previous handlers return on exit."""

    def __init__(self, names: Sequence[Any] | None = DEFAULT_SIGNALS) -> None:
        self.signals = parse_signals(names)
        if signal.SIGINT not in self.signals:
            self.signals.append(signal.SIGINT)
        self.requested: signal.Signals | None = None
        self.interrupts = 0  # SIGINTs received: the second one stops at once
        self._previous: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the trainer acts at the next step boundary, where the state is consistent.
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                # The user would rather lose the partial epoch than wait; the atomic checkpoint write
                # keeps whatever was last completed loadable.
                raise KeyboardInterrupt
        if self.requested is None:
            self.requested = sig
            more = " (Ctrl-C again to stop at once)" if sig == signal.SIGINT else ""
            print(
                f"\nreceived {sig.name}: writing a checkpoint at the next step boundary{more}",
                file=sys.stderr,
                flush=True,
            )
        elif sig == signal.SIGINT:
            # A scheduler's stop is already pending; say that Ctrl-C was seen and how to skip the wait.
            print(
                f"\nreceived SIGINT: a checkpoint is already due at the next step boundary "
                f"({self.requested.name}); Ctrl-C again to stop at once",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal works in the main thread only; no handling elsewhere
        for sig in self.signals:
            if sig == signal.SIGINT and signal.getsignal(sig) is signal.SIG_IGN:
                continue  # ignored by the shell that started us (a background job): keep it so
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except (OSError, ValueError):
                pass
        return self

    def restore(self) -> None:
        """Put back the handlers that were installed before `__enter__`."""
        for sig, previous in self._previous.items():
            try:
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
            except (OSError, ValueError, TypeError):
                pass
        self._previous.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()

    def deliver(self, message: str) -> None:
        """After the checkpoint: chain to the previous handler if it was a callable (never for SIGINT),
        else exit with `exit_code(requested)`."""
        sig = self.requested
        previous = self._previous.get(sig) if sig is not None else None
        self.restore()
        print(message, file=sys.stderr, flush=True)
        not_chained = (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler)
        if sig is not None and sig != signal.SIGINT and callable(previous) and previous not in not_chained:
            chained: Callable[[int, FrameType | None], Any] = previous
            chained(int(sig), None)
        raise TrainingInterrupted(message, exit_code(sig))
