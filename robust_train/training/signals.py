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
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class TrainingInterrupted(SystemExit):
    """Raised after the interrupt checkpoint is written; exits the process with EXIT_INTERRUPTED."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_INTERRUPTED)
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
    """While active, the given signals only set `requested`; the previous handlers return on exit."""

    def __init__(self, names: Sequence[Any] | None = DEFAULT_SIGNALS) -> None:
        self.signals = parse_signals(names)
        self.requested: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the trainer acts at the next step boundary, where the state is consistent.
        if self.requested is None:
            self.requested = signal.Signals(signum)
            print(
                f"\nreceived {self.requested.name}: writing a checkpoint at the next step boundary",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal works in the main thread only; no handling elsewhere
        for sig in self.signals:
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
        """After the checkpoint: chain to the previous handler if it was a callable, else exit (75)."""
        sig = self.requested
        previous = self._previous.get(sig) if sig is not None else None
        self.restore()
        print(message, file=sys.stderr, flush=True)
        if sig is not None and callable(previous) and previous not in (signal.SIG_DFL, signal.SIG_IGN):
            chained: Callable[[int, FrameType | None], Any] = previous
            chained(int(sig), None)
        raise TrainingInterrupted(message)
