"""Checkpoints: atomic, checksummed, with the previous good file kept as a fallback.

Layout in a run directory (for `last.pt`; `best.pt` alike):

- `last.pt`              the newest checkpoint (a plain torch file: `torch.load` still opens it)
- `last.pt.sha256`       its SHA-256, written before the rename and verified on load
- `last.prev.pt` (+ .sha256)  the checkpoint it replaced

Writing order: new file and new checksum go to fsynced temporaries; the current pair is renamed to
`.prev`; the temporaries are renamed into place. A hard kill at any point therefore leaves either a
complete verified pair, or a missing/unverifiable newest file next to a good `.prev`, from which
`load_checkpoint(..., fallback=True)` restores with a warning. A checkpoint without a checksum file
(copied elsewhere, or older) loads without verification; torch's zip reader still refuses truncation.
"""

from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robust_train.errors import CheckpointError
from robust_train.io import fsync_dir, remove_stale_temporaries, sha256_file, storage_error, write_temporary

CHECKPOINT_FORMAT = "robust-train-checkpoint"
CHECKPOINT_VERSION = 1


def checksum_path(path: Path | str) -> Path:
    """The sidecar holding `path`'s SHA-256."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def previous_path(path: Path | str) -> Path:
    """Where the checkpoint replaced by the latest save of `path` is kept (last.pt -> last.prev.pt)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: bool = True) -> None:
    """Write a checkpoint atomically with its checksum; keep the file it replaces as `<stem>.prev.pt`.

    Raises StorageError (also an OSError) naming the path and free space when the disk is full; the
    existing checkpoint is then untouched.
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    remove_stale_temporaries(path)
    remove_stale_temporaries(checksum_path(path))
    tmp = write_temporary(path, lambda t: torch.save(payload, t))
    try:
        digest = sha256_file(tmp)
        tmp_sum = write_temporary(
            checksum_path(path), lambda t: Path(t).write_text(f"{digest}  {path.name}\n")
        )
    except BaseException:
        os.unlink(tmp)
        raise
    try:
        old_sum = checksum_path(path)
        if keep_previous and path.exists():
            prev = previous_path(path)
            # The checksum moves first: a kill between the two renames leaves prev unverified (still
            # loadable) and `path` without a stale checksum that would wrongly fail it.
            if old_sum.exists():
                os.replace(old_sum, checksum_path(prev))
            else:
                checksum_path(prev).unlink(missing_ok=True)
            os.replace(path, prev)
        else:
            old_sum.unlink(missing_ok=True)
        os.replace(tmp, path)
        os.replace(tmp_sum, old_sum)
    except OSError as err:
        for t in (tmp, tmp_sum):
            if os.path.exists(t):
                os.unlink(t)
        raise storage_error(path, err) from err
    fsync_dir(path.parent)


def verify_checkpoint(path: Path | str) -> bool | None:
    """True if `path` matches its checksum file, False if not, None when there is no checksum file."""
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return None
    try:
        expected = sidecar.read_text().split()[0]
    except (OSError, IndexError):
        return False
    return sha256_file(path) == expected


# Pickled globals other tools' checkpoints commonly hold besides tensors (numpy scalars for accuracies,
# their dtypes): rebuilding them runs no code of the file's choosing, so they are allowed by name.
_NUMPY_SCALAR_GLOBALS = ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype")


def _harmless_globals(path: Path) -> list[Any] | None:
    """The numpy scalar/dtype globals `path` needs, or None when it needs any other global."""
    import importlib

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return None
    found: list[Any] = []
    for name in names:
        module, _, attr = name.rpartition(".")
        harmless = name in _NUMPY_SCALAR_GLOBALS or (module == "numpy.dtypes" and attr.endswith("DType"))
        if not harmless:
            return None
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            return None
    if "numpy.dtype" in names:  # a dtype is rebuilt from its class (numpy.dtypes.Float64DType, ...)
        found += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return found


def read_torch_file(path: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """The object a torch file holds, read with `weights_only` (tensors and plain containers only).

    Any torch file, ours or not: CheckpointError when it is missing, unreadable, holds pickled Python
    objects (loading those would run their code), or does not match its `.sha256` sidecar.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint={path} does not exist")
    verified = verify_checkpoint(path)
    try:
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            allowed = _harmless_globals(path)
            if not allowed:
                raise
            with torch.serialization.safe_globals(allowed):
                state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            unsafe = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:
            unsafe = ""
        if unsafe:
            # weights_only refuses arbitrary globals: unpickling them would execute code from the file.
            raise CheckpointError(
                f"checkpoint={path} holds pickled Python objects besides tensors ({unsafe[:200]}), which "
                "are not loaded (that would run code from the file); if you trust it, re-save its weights: "
                "torch.save(torch.load(f, weights_only=False)['state_dict'], 'weights.pt')"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint={path} is unreadable (truncated or not a torch file): {first}"
        ) from None
    except Exception as err:  # torch raises several types for truncated/garbled files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint={path} is unreadable (truncated or not a torch file): {first}"
        ) from None
    if verified is False:
        # Readable but not what was written: a flipped bit in a tensor would otherwise go unnoticed.
        raise CheckpointError(
            f"checkpoint={path} is corrupt: its SHA-256 does not match {checksum_path(path).name} "
            "(interrupted copy or disk error)"
        )
    return state


def is_robust_train_checkpoint(state: Any) -> bool:
    """Whether a loaded torch object carries our checkpoint tag (of any version)."""
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


def check_checkpoint_state(path: Path | str, state: Any) -> dict[str, Any]:
    """`state` (read from `path`) if it is a robust-train checkpoint of the version this code reads."""
    if not is_robust_train_checkpoint(state):
        raise CheckpointError(
            f"checkpoint={path} is not a robust-train checkpoint (no '{CHECKPOINT_FORMAT}' tag); other "
            "weights: robust-eval state_dict=<file> model.name=<arch> model.normalize=none|meanstd, or "
            "model_zoo.name=<RobustBench name>"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint={path} has format version {state.get('version')}; this robust-train reads "
            f"version {CHECKPOINT_VERSION}"
        )
    return dict(state)


def _load_one(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    return check_checkpoint_state(path, read_torch_file(path, map_location))


def load_checkpoint(
    path: Path | str, map_location: str | torch.device = "cpu", fallback: bool = False
) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; CheckpointError if missing, truncated, corrupt
    or foreign.

    With `fallback`, a bad or missing newest file is replaced by the previous good one
    (`<stem>.prev.pt`) with a warning; the error is raised only when both are unusable.
    """
    if not fallback:
        return _load_one(Path(path), map_location)
    return load_newest_checkpoint(path, map_location)[0]


def load_newest_checkpoint(
    path: Path | str, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], Path]:
    """`load_checkpoint(path, fallback=True)`, and the file that was read (`path` or its `.prev.pt`)."""
    path = Path(path)
    try:
        return _load_one(path, map_location), path
    except CheckpointError as err:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        try:
            state = _load_one(prev, map_location)
        except CheckpointError as err2:
            raise CheckpointError(f"{err}; the fallback is unusable too: {err2}") from None
        # One warning: stderr is teed into cli.log, so a second printed copy only repeated it.
        warnings.warn(
            f"{err}; using the previous checkpoint {prev} (epoch {state.get('epoch')}) instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return state, prev


def resumable_checkpoint(path: Path | str) -> bool:
    """Whether a run directory holds `path` or its previous copy to resume from."""
    return Path(path).is_file() or previous_path(path).is_file()


def rng_state() -> dict[str, Any]:
    """Every global RNG state (python, numpy, torch CPU and CUDA) in a weights_only-loadable form."""
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # legacy=True: (name, keys, pos, has_gauss, cached_gaussian)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
