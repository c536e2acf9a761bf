"""The console record of a job: everything it prints, also appended to the job's log file.

Hydra's log file (`<run dir>/cli.log`) receives only `logging` records, so the epoch lines, results
tables and warnings, which are printed, were missing from it. While a job runs, stdout and stderr are
teed into that file. Progress bars redraw a line with carriage returns: the file keeps only the last
state of each line, so it holds the final bar and not thousands of redraws.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TextIO


class _Tee:
    """A text stream that writes through to `stream` and appends whole lines to `log`."""

    def __init__(self, stream: TextIO, log: IO[str]) -> None:
        self._stream = stream
        self._log = log
        self._pending = ""

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        try:
            self._record(text)
        except (OSError, ValueError):  # a full disk or a closed file must not stop the job
            pass
        return written

    def _record(self, text: str) -> None:
        self._pending += text
        if "\n" not in self._pending:
            # Keep only the bar's latest state while it redraws in place.
            self._pending = self._pending.rsplit("\r", 1)[-1] if "\r" in self._pending else self._pending
            return
        *lines, self._pending = self._pending.split("\n")
        self._log.write("".join(line.rsplit("\r", 1)[-1] + "\n" for line in lines))
        self._log.flush()

    def flush(self) -> None:
        self._stream.flush()

    def close_record(self) -> None:
        if self._pending.strip():
            self._record("\n")

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the real stream's
        return getattr(self._stream, name)


@contextmanager
def console_record(path: Path) -> Iterator[None]:
    """Append stdout and stderr to `path` (creating it) while the block runs."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed below, after the streams
    except OSError:
        yield
        return
    out, err = sys.stdout, sys.stderr
    tees = _Tee(out, log), _Tee(err, log)
    sys.stdout, sys.stderr = tees
    try:
        yield
    finally:
        for tee in tees:
            tee.close_record()
        if sys.stdout is tees[0]:
            sys.stdout = out
        if sys.stderr is tees[1]:
            sys.stderr = err
        log.close()
