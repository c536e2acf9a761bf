"""File helpers shared by every part that writes state to disk.

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of the directory), so a
reader, or a run restarted after a hard kill, sees either the old file or the new one, never half of
one. A full disk or exhausted quota becomes a `StorageError` naming the path and the free space, and
the previous file is left untouched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from robust_train.errors import StorageError

# errno values that mean "the disk (or the user's share of it) is full": the user can act on these.
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}


def free_space(directory: Path) -> str:
    """Free space on the filesystem holding `directory`, human-readable ("?" if unknown)."""
    try:
        free = float(shutil.disk_usage(directory).free)
    except OSError:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.1f} {unit}"
        free /= 1024
    return "?"


def storage_error(path: Path, err: OSError) -> StorageError:
    """A one-line, actionable error for a failed write of `path`."""
    reason = os.strerror(err.errno) if err.errno else str(err)
    hint = "free some space or point hydra.run.dir elsewhere" if err.errno in _FULL else "check the path"
    return StorageError(
        f"could not write {path}: {reason} (free space there: {free_space(path.parent)}); "
        f"the previous {path.name} is unchanged; {hint}"
    )


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: not every OS/filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(path: Path) -> None:
    """Delete temporary files a hard-killed writer of `path` left behind."""
    for tmp in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass


def write_temporary(path: Path, write: Callable[[str], Any]) -> str:
    """Call `write(tmp)` for a temporary file beside `path`, fsync it and return its name.

    The caller renames it into place (os.replace) or deletes it; on error it is already deleted.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise storage_error(path, err) from err
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise storage_error(path, err) from err
        raise
    return tmp


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """Call `write(tmp_path)` then rename over `path`, so readers never see a half-written file."""
    path = Path(path)
    tmp = write_temporary(path, write)
    try:
        os.replace(tmp, path)
    except OSError as err:
        os.unlink(tmp)
        raise storage_error(path, err) from err
    fsync_dir(path.parent)


def sha256_file(path: Path | str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
