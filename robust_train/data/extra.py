"""Extra training images (e.g. generated ones) streamed from uncompressed `.npz` files on disk.

The format is the one the DM-Improves-AT authors (Wang et al. 2023) publish: an `np.savez` archive
holding `image` (uint8, N x H x W x C) and `label` (integers, N; pseudo-labels, used as given). 20M
CIFAR images are 61 GB, so nothing here loads a file: `np.load(mmap_mode=...)` cannot map the members
of a zip, so each member's array data is located by hand (the zip's local file header, then the .npy
header) and mapped read-only. A training step gathers only its rows (sorted, for locality), turns them
from HWC into CHW uint8 on the CPU, pins them (CUDA) and copies them to the device without blocking;
augmentation then runs on the device as for the original images.

Batches mix original and extra images (`dataset.extra_fraction`, DM-AT's `unsup_fraction`). The plan of
an epoch (which original and which extra images each step uses) is fixed before the epoch starts:
original indices come from the trainer's data generator (a fresh permutation per epoch, as without extra
data) and extra indices from a stream of permutations of the extra set, each seeded by (run seed, pass
number), so a given epoch's extra indices depend only on the seed and the epoch. A background thread
reads the next few planned batches; it follows the plan and draws no random numbers, so prefetching
never changes results, and the plan saved in a mid-epoch checkpoint resumes the epoch exactly.

`python -m robust_train.data.extra convert IN.npz OUT.npz` rewrites a compressed archive
(`np.savez_compressed`) uncompressed, streaming, without holding the arrays in memory.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import queue
import struct
import sys
import threading
import warnings
import weakref
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from numpy.lib import format as npy_format

from robust_train.errors import DataError

__all__ = [
    "EXTRA_KEYS",
    "EpochPlan",
    "ExtraData",
    "ExtraFeed",
    "ExtraSource",
    "NpyMember",
    "NpzWriter",
    "check_extra_files",
    "convert_npz",
    "default_epoch_steps",
    "extra_per_batch",
    "npz_members",
    "plan_epoch",
    "resolve_extra_path",
]

# The arrays of the DM-Improves-AT format.
EXTRA_KEYS = ("image", "label")
MISSING_MARK = "???"
FORMAT_HELP = "the DM-Improves-AT format holds `image` (uint8, N x H x W x C) and `label` (integers, N)"
# Keeps the extra-index stream apart from every other generator seeded from the run seed.
_STREAM_SEED_TAG = 0x0E7A_DA7A
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # the zip local file header, 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
_METHODS = {
    zipfile.ZIP_DEFLATED: "ZIP_DEFLATED",
    zipfile.ZIP_BZIP2: "ZIP_BZIP2",
    zipfile.ZIP_LZMA: "ZIP_LZMA",
}
# Labels are scanned for their range in chunks of this many entries (a 20M-image file has 160 MB of labels).
_LABEL_CHUNK = 1 << 22
# After each batch the reader drops the pages it touched from this process's mapping (the kernel keeps
# them in its page cache): mapped, they would count as resident memory of the trainer and grow with the
# run. A fault maps the aligned window of this many bytes around it (Linux's fault_around_bytes), so that
# window is what is dropped. Every _RELEASE_ALL_EVERY batches the whole mapping is dropped as well; that
# walks the page tables of the whole file (milliseconds for tens of GB), too slow to do per batch.
_FAULT_AROUND = 1 << 16
_RELEASE_ALL_EVERY = 1024
PREFETCH_DEPTH = 4


# ----------------------------------------------------------------------------- the archive


@dataclass(frozen=True)
class NpyMember:
    """One array of an uncompressed .npz: where its data starts in the file, its dtype and shape."""

    key: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape)) * self.dtype.itemsize


def resolve_extra_path(path: str | os.PathLike[str]) -> Path:
    """A `dataset.extra` entry as an absolute path (relative ones are taken from the working directory)."""
    return Path(path).expanduser().absolute()


def _convert_hint(path: Path) -> str:
    return (
        f"re-save it uncompressed with np.savez (not np.savez_compressed), or convert it streaming with "
        f"`python -m robust_train.data.extra convert {path} {path.with_name(path.stem + '_stored.npz')}`"
    )


def _read_npy_header(f: IO[bytes], key: str, path: Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = npy_format.read_magic(f)
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(f)
    raise DataError(
        f"{path}: `{key}` is stored as .npy format version {version[0]}.{version[1]}, which this reader "
        f"does not map; re-save it with np.savez"
    )


def npz_members(path: Path) -> dict[str, NpyMember]:
    """Every array of the uncompressed .npz at `path`, located for memory mapping (no array is read).

    DataError (one line) for a file that is not a zip, a compressed or encrypted member, a member that is
    not a .npy array, or an array in Fortran order or of object dtype.
    """
    out: dict[str, NpyMember] = {}
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            infos = zipfile.ZipFile(f).infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise DataError(f"{path} is not an .npz (zip) archive: {exc}") from exc
        for info in infos:
            key = info.filename.removesuffix(".npy")
            if info.compress_type != zipfile.ZIP_STORED:
                method = _METHODS.get(info.compress_type, str(info.compress_type))
                raise DataError(
                    f"{path}: `{key}` is compressed ({method}) and cannot be memory-mapped; "
                    + _convert_hint(path)
                )
            if info.flag_bits & 0x1:
                raise DataError(f"{path}: `{key}` is encrypted and cannot be memory-mapped")
            if not info.filename.endswith(".npy"):
                continue  # not an array (np.load ignores such members too)
            f.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            if fields[0] != _LOCAL_SIGNATURE:
                raise DataError(f"{path}: the zip entry of `{key}` is damaged (no local file header)")
            name_len, extra_len = fields[-2], fields[-1]
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
            f.seek(start)
            try:
                shape, fortran, dtype = _read_npy_header(f, key, path)
            except ValueError as exc:
                raise DataError(f"{path}: `{key}` is not a readable .npy array: {exc}") from exc
            if dtype.hasobject:
                raise DataError(f"{path}: `{key}` holds Python objects (dtype {dtype}); expected numbers")
            if fortran and len(shape) > 1:
                raise DataError(
                    f"{path}: `{key}` is stored in Fortran order; re-save it C-contiguous "
                    f"(np.savez(..., {key}=np.ascontiguousarray(a)))"
                )
            member = NpyMember(key, f.tell(), dtype, tuple(int(s) for s in shape))
            if member.offset + member.nbytes > min(size, start + info.file_size):
                raise DataError(
                    f"{path}: `{key}` is truncated ({member.shape} {dtype} needs {member.nbytes} bytes)"
                )
            out[key] = member
    return out


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _FileInfo:
    n: int
    hwc: tuple[int, ...]
    label_min: int
    label_max: int


def _label_range(path: Path, member: NpyMember) -> tuple[int, int]:
    lo, hi = None, None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        labels = np.frombuffer(mm, dtype=member.dtype, count=member.shape[0], offset=member.offset)
        for start in range(0, labels.shape[0], _LABEL_CHUNK):
            chunk = labels[start : start + _LABEL_CHUNK]
            lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
            hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
        del labels, chunk  # the views must go before the mapping closes
    assert lo is not None and hi is not None
    return lo, hi


@functools.lru_cache(maxsize=64)
def _inspect(path_str: str, size: int, mtime_ns: int) -> _FileInfo | str:
    """What the checks need from one file, or the problem found (cached per file version)."""
    path = Path(path_str)
    try:
        members = npz_members(path)
    except DataError as exc:
        return str(exc).removeprefix(f"{path}: ").removeprefix(f"{path} ")
    missing = [k for k in EXTRA_KEYS if k not in members]
    if missing:
        found = ", ".join(sorted(members)) or "no arrays"
        return f"no `{missing[0]}` array (found: {found}); {FORMAT_HELP}"
    image, label = members["image"], members["label"]
    if image.dtype != np.uint8:
        return f"`image` is {image.dtype}, expected uint8 (0..255); {FORMAT_HELP}"
    if len(image.shape) != 4:
        return f"`image` has shape {image.shape}, expected N x H x W x C; {FORMAT_HELP}"
    if label.dtype.kind not in "iu" or len(label.shape) != 1:
        return f"`label` is {label.dtype} of shape {label.shape}, expected integers (N,); {FORMAT_HELP}"
    if label.shape[0] != image.shape[0]:
        return f"`label` has {label.shape[0]} entries but `image` has {image.shape[0]} images"
    if image.shape[0] == 0:
        return "`image` holds no images"
    lo, hi = _label_range(path, label)
    return _FileInfo(image.shape[0], image.shape[1:], lo, hi)


def _file_problem(
    path: Path, key: str, image_shape: Sequence[int] | None, num_classes: int | None
) -> tuple[_FileInfo | None, str | None]:
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        return None, f"{key}={path} {why}; give the path of an .npz file ({FORMAT_HELP})"
    st = path.stat()
    info = _inspect(str(path), st.st_size, st.st_mtime_ns)
    if isinstance(info, str):
        return None, f"{key}={path}: {info}"
    if image_shape is not None:
        c, h, w = image_shape
        if tuple(info.hwc) != (h, w, c):
            hh, ww, cc = info.hwc
            return None, (
                f"{key}={path}: `image` holds {cc}x{hh}x{ww} images (stored H x W x C as {list(info.hwc)}), "
                f"but the dataset's images are {c}x{h}x{w} (dataset.image_shape={list(image_shape)})"
            )
    if info.label_min < 0 or (num_classes is not None and info.label_max >= num_classes):
        allowed = f"0..{num_classes - 1} (dataset.num_classes={num_classes})" if num_classes else ">= 0"
        return None, (
            f"{key}={path}: `label` ranges from {info.label_min} to {info.label_max}; allowed: {allowed}"
        )
    return info, None


def check_extra_files(
    paths: Sequence[str],
    image_shape: Sequence[int] | None,
    num_classes: int | None,
    key: str = "dataset.extra",
) -> list[str]:
    """One problem line per unusable file: missing, not an uncompressed .npz, wrong keys, dtypes or shapes,
    images of another size than the dataset's (`image_shape` is C, H, W; the files store H, W, C), labels
    outside [0, num_classes). Files are inspected without being read (labels are scanned for their range);
    results are cached per file version, so repeated checks are free."""
    problems: list[str] = []
    if any(str(entry).strip() == MISSING_MARK for entry in paths):
        # A preset that needs the user's files lists Hydra's missing mark (merging `???` over null would
        # keep the null): name what to set, not a path called ???.
        return [
            f"{key} is required by this preset: set {key}=/path/to/images.npz (a path or a list of "
            "DM-Improves-AT .npz files)"
        ]
    shapes: dict[tuple[int, ...], str] = {}
    for i, entry in enumerate(paths):
        where = key if len(paths) == 1 else f"{key}[{i}]"
        info, problem = _file_problem(resolve_extra_path(entry), where, image_shape, num_classes)
        if problem is not None:
            problems.append(problem)
        elif info is not None:
            shapes.setdefault(tuple(info.hwc), f"{where}={resolve_extra_path(entry)}")
    if len(shapes) > 1:
        problems.append(
            f"{key}: the files hold images of different shapes ("
            + ", ".join(f"{where}: {list(s)}" for s, where in shapes.items())
            + ")"
        )
    return problems


# ----------------------------------------------------------------------------- memory-mapped arrays


class _MappedFile:
    """One .npz mapped read-only: `images` (N, H, W, C) and `labels` (N,) are views of the mapping."""

    def __init__(self, path: Path) -> None:
        members = npz_members(path)
        image, label = members["image"], members["label"]
        self.path = path
        self.n = image.shape[0]
        self._file = open(path, "rb")  # noqa: SIM115  (closed by close())
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            # Rows are read a few kilobytes at a time, scattered: read-ahead would fetch pages never used.
            self._map.madvise(mmap.MADV_RANDOM)
        with warnings.catch_warnings():
            # The mapping is read-only and never written through; torch warns about every such buffer.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._map, dtype=torch.uint8, count=image.nbytes, offset=image.offset)
        self.images = flat.view(image.shape)
        self.labels = np.frombuffer(self._map, dtype=label.dtype, count=self.n, offset=label.offset)
        self._image_offset, self._label_offset = image.offset, label.offset
        self._row_bytes = image.nbytes // max(self.n, 1)

    def _advise(self, option: int, starts: np.ndarray, nbytes: int, align: int) -> None:
        """madvise(option) on the `align`-aligned windows covering [start, start + nbytes) for each start
        (sorted), adjacent windows merged into one call."""
        lo = starts // align * align
        hi = np.minimum((starts + nbytes + align - 1) // align * align, len(self._map))
        run_lo, run_hi = -1, -1
        for a, b in zip(lo.tolist(), hi.tolist(), strict=True):
            if a <= run_hi:
                run_hi = max(run_hi, b)
                continue
            if run_hi > run_lo >= 0:
                self._map.madvise(option, run_lo, run_hi - run_lo)
            run_lo, run_hi = a, b
        if run_hi > run_lo >= 0:
            self._map.madvise(option, run_lo, run_hi - run_lo)

    def will_need(self, local: np.ndarray) -> None:
        """Ask the kernel to start reading rows `local` now (asynchronously, all at once), so the gather
        finds them in the page cache instead of faulting them in one at a time from disk."""
        if hasattr(self._map, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            starts = self._image_offset + local * self._row_bytes
            self._advise(mmap.MADV_WILLNEED, starts, self._row_bytes, mmap.PAGESIZE)

    def release_rows(self, local: np.ndarray) -> None:
        """Drop the pages that reading rows `local` (images and labels) mapped into this process."""
        if hasattr(self._map, "madvise"):
            starts = self._image_offset + local * self._row_bytes
            self._advise(mmap.MADV_DONTNEED, starts, self._row_bytes, _FAULT_AROUND)
            size = self.labels.dtype.itemsize
            self._advise(mmap.MADV_DONTNEED, self._label_offset + local * size, size, _FAULT_AROUND)

    def release(self) -> None:
        if hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        # Views must go before the mapping can close (mmap refuses while buffers are exported).
        self.images = torch.empty(0, dtype=torch.uint8)
        self.labels = np.empty(0, dtype=np.int64)
        try:
            self._map.close()
        except BufferError:
            pass  # a tensor still views it: the mapping closes when that tensor goes
        self._file.close()


class ExtraData:
    """Several memory-mapped .npz files as one indexable set of images (concatenated in order)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.files = [_MappedFile(resolve_extra_path(p)) for p in paths]
        if not self.files:
            raise DataError("dataset.extra lists no files")
        shapes = {tuple(f.images.shape[1:]) for f in self.files}
        if len(shapes) != 1:
            raise DataError(f"dataset.extra: the files hold images of different shapes: {sorted(shapes)}")
        h, w, c = next(iter(shapes))
        self.image_shape = (c, h, w)
        self.starts = np.cumsum([0] + [f.n for f in self.files])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, idx: np.ndarray, out_x: torch.Tensor, out_y: torch.Tensor) -> None:
        """Rows `idx` (sorted) into `out_x` (len(idx), C, H, W) uint8 and `out_y` (len(idx),) int64."""
        cut = np.searchsorted(idx, self.starts)
        for f, start, a, b in zip(self.files, self.starts[:-1], cut[:-1], cut[1:], strict=True):
            if a == b:
                continue
            local = idx[a:b] - start
            # One pass: index_select of the CHW view writes the transposed rows straight into the output
            # (and releases the GIL, so the training thread runs meanwhile).
            torch.index_select(f.images.permute(0, 3, 1, 2), 0, torch.from_numpy(local), out=out_x[a:b])
            out_y[a:b] = torch.from_numpy(f.labels[local].astype(np.int64, copy=False))

    def will_need(self, idx: np.ndarray) -> None:
        """Start reading rows `idx` (sorted) from disk in the background (see _MappedFile.will_need)."""
        cut = np.searchsorted(idx, self.starts)
        for f, start, a, b in zip(self.files, self.starts[:-1], cut[:-1], cut[1:], strict=True):
            if a < b:
                f.will_need(idx[a:b] - start)

    def release_rows(self, idx: np.ndarray) -> None:
        """Drop the pages that gathering rows `idx` (sorted) mapped into this process."""
        cut = np.searchsorted(idx, self.starts)
        for f, start, a, b in zip(self.files, self.starts[:-1], cut[:-1], cut[1:], strict=True):
            if a < b:
                f.release_rows(idx[a:b] - start)

    def release(self) -> None:
        """Drop every page of the files from this process's mapping (they stay in the kernel's page cache)."""
        for f in self.files:
            f.release()

    def close(self) -> None:
        for f in self.files:
            f.close()


# ----------------------------------------------------------------------------- the epoch's plan


def extra_per_batch(batch_size: int, fraction: float) -> int:
    """Extra images in a full batch: int(batch_size x fraction), as DM-AT's sampler rounds."""
    return int(batch_size * fraction)


def default_epoch_steps(n_train: int, batch_size: int) -> int:
    """Steps of an epoch with extra data when `dataset.epoch_steps` is null: ceil(n_train / batch_size).

    This is DM-Improves-AT's definition (`num_batches = ceil(dataset_size / batch_size)` in
    core/data/semisup.py, with dataset_size the 50,000 CIFAR training images): an epoch processes as
    many images as one pass over the original training set, of which (1 - extra_fraction) are original.
    """
    return max(1, math.ceil(n_train / batch_size))


class _IndexStream:
    """Positions 0, 1, 2, ... of an endless stream of extra-image indices: pass k is a permutation of
    range(n) seeded by (seed, k), so every image is used once before any is used twice."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = int(seed)
        self._cached: tuple[int, np.ndarray] | None = None

    def _permutation(self, k: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != k:
            rng = np.random.default_rng([self.seed, _STREAM_SEED_TAG, k])
            dtype = np.int32 if self.n < 2**31 else np.int64  # half the memory for up to 2G images
            self._cached = (k, rng.permutation(np.arange(self.n, dtype=dtype)))
        return self._cached[1]

    def take(self, start: int, count: int) -> np.ndarray:
        parts = []
        while count > 0:
            k, offset = divmod(start, self.n)
            part = self._permutation(k)[offset : offset + count]
            parts.append(part)
            start += len(part)
            count -= len(part)
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


@dataclass
class EpochPlan:
    """Per step of an epoch: indices into the original training set (on the data generator's device)
    and sorted indices into the extra images (CPU int64)."""

    orig: list[torch.Tensor]
    extra: list[torch.Tensor]


def plan_epoch(
    n_train: int,
    batch_size: int,
    fraction: float,
    steps: int,
    generator: torch.Generator,
    stream: _IndexStream,
    epoch: int,
) -> EpochPlan:
    """The batches of one epoch with extra data; every batch holds `batch_size` images.

    Original images: consecutive chunks of (batch_size - int(batch_size x fraction)) indices of a fresh
    permutation drawn from `generator` (the trainer's data generator, as without extra data); when the
    epoch has more steps than chunks another permutation follows. A permutation's last chunk may be short:
    that batch takes more extra images (DM-AT's sampler does the same). Extra images: the next positions
    of the seeded index stream, epoch after epoch, sorted within each batch for locality on disk.
    """
    n_orig = batch_size - extra_per_batch(batch_size, fraction)
    device = generator.device
    orig: list[torch.Tensor] = []
    if n_orig > 0 and n_train > 0:
        while len(orig) < steps:
            orig += list(torch.randperm(n_train, generator=generator, device=device).split(n_orig))
        orig = orig[:steps]
    else:
        orig = [torch.empty(0, dtype=torch.int64, device=device)] * steps
    counts = [batch_size - len(o) for o in orig]
    # The chunk sizes do not depend on the draw, so every epoch takes the same number of extra images and
    # epoch e starts at a position known without replaying the epochs before it.
    per_epoch = sum(counts)
    positions = stream.take(epoch * per_epoch, per_epoch)
    extra, at = [], 0
    for count in counts:
        extra.append(torch.from_numpy(np.sort(positions[at : at + count])))
        at += count
    return EpochPlan(orig, extra)


# ----------------------------------------------------------------------------- the background reader


def _read_ahead(
    data: ExtraData,
    steps: list[torch.Tensor],
    pin: bool,
    out: queue.Queue[Any],
    stop: threading.Event,
) -> None:
    """Gather each planned batch into fresh (pinned) CPU tensors and queue it; the queue's bound keeps the
    reader a few batches ahead. Holds no reference to the ExtraFeed, so dropping the feed stops it."""
    c, h, w = data.image_shape
    try:
        if steps:
            data.will_need(steps[0].numpy())
        for k, idx in enumerate(steps):
            if stop.is_set():
                return
            if k + 1 < len(steps):
                # The next batch's rows load from disk while this one is gathered (and the GPU trains).
                data.will_need(steps[k + 1].numpy())
            n = int(idx.shape[0])
            # Fresh buffers per batch: the caching host allocator reuses a pinned block only after the
            # copy that reads it has finished, so a non-blocking copy never sees it overwritten.
            x = torch.empty((n, c, h, w), dtype=torch.uint8, pin_memory=pin)
            y = torch.empty((n,), dtype=torch.int64, pin_memory=pin)
            data.gather(idx.numpy(), x, y)
            data.release_rows(idx.numpy())
            if (k + 1) % _RELEASE_ALL_EVERY == 0:
                data.release()
            item: Any = (x, y)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except BaseException as exc:  # handed to the training thread, which raises it
        files = ", ".join(str(f.path) for f in data.files)
        error = DataError(f"dataset.extra: reading {files} failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        while not stop.is_set():
            try:
                out.put(error, timeout=0.1)
                return
            except queue.Full:
                continue


class ExtraFeed:
    """The extra images of an epoch's remaining steps, read ahead by a background thread.

    `next()` returns the next step's (images uint8 CHW, labels int64) on `device`; the copy from pinned
    memory does not block the host. `close()` stops the reader (also done when the feed is dropped).
    """

    def __init__(
        self,
        data: ExtraData,
        steps: Sequence[torch.Tensor],
        device: torch.device,
        depth: int | None = None,
    ) -> None:
        self.device = device
        depth = PREFETCH_DEPTH if depth is None else depth  # read at call time (tests vary it)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_read_ahead,
            args=(data, [s.cpu() for s in steps], device.type == "cuda", self._queue, self._stop),
            name="robust-train-extra-reader",
            daemon=True,
        )
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._thread.start()

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        x, y = item
        if self.device.type == "cpu":
            return x, y
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a reader waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)


class ExtraSource:
    """The extra images of a run: the mapped files and their index stream (what the trainer keeps)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], seed: int) -> None:
        self.paths = [str(p) for p in paths]
        self.data = ExtraData(paths)
        self.stream = _IndexStream(len(self.data), seed)

    def __len__(self) -> int:
        return len(self.data)

    def plan(
        self,
        epoch: int,
        n_train: int,
        batch_size: int,
        fraction: float,
        steps: int,
        generator: torch.Generator,
    ) -> EpochPlan:
        return plan_epoch(n_train, batch_size, fraction, steps, generator, self.stream, epoch)

    def feed(self, steps: Sequence[torch.Tensor], device: torch.device) -> ExtraFeed:
        return ExtraFeed(self.data, steps, device)

    def close(self) -> None:
        self.data.close()


# ----------------------------------------------------------------------------- writing and converting


class NpzWriter:
    """Writes an uncompressed .npz of `image` (n, H, W, C) uint8 and `label` (n,) in chunks.

    The images stream into the archive as they come, so files larger than memory can be written; the
    labels (8 bytes per image) are kept until `close()` writes them as the second member, as np.savez
    orders them. The result loads with np.load and maps with ExtraData.
    """

    def __init__(self, path: str | os.PathLike[str], n: int, hwc: Sequence[int]) -> None:
        self.path = Path(path)
        self.n = int(n)
        self.hwc = tuple(int(v) for v in hwc)
        self.written = 0
        self.labels = np.empty(self.n, dtype=np.int64)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("image.npy", "w", force_zip64=True)
        header = {"descr": npy_format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                  "shape": (self.n, *self.hwc)}  # fmt: skip
        npy_format.write_array_header_1_0(self._member, header)

    def write(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.hwc:
            raise ValueError(f"expected uint8 images of shape (k, {', '.join(map(str, self.hwc))})")
        k = images.shape[0]
        if self.written + k > self.n or labels.shape != (k,):
            raise ValueError("more images than announced, or labels that do not match the images")
        self._member.write(np.ascontiguousarray(images).data)
        self.labels[self.written : self.written + k] = labels
        self.written += k

    def close(self) -> None:
        if self.written != self.n:
            self._member.close()
            self._zip.close()
            raise ValueError(f"{self.path}: {self.written} images written, {self.n} announced")
        self._member.close()
        with self._zip.open("label.npy", "w", force_zip64=True) as member:
            npy_format.write_array(member, self.labels, allow_pickle=False)
        self._zip.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._member.close()
            self._zip.close()


def _chunks_of(member: IO[bytes], dtype: np.dtype, shape: tuple[int, ...], rows: int) -> Iterator[np.ndarray]:
    row_bytes = int(math.prod(shape[1:])) * dtype.itemsize
    left = shape[0]
    while left > 0:
        k = min(rows, left)
        buf = member.read(k * row_bytes)
        if len(buf) != k * row_bytes:
            raise DataError("the archive ended before the array did")
        yield np.frombuffer(buf, dtype=dtype).reshape(k, *shape[1:])
        left -= k


def convert_npz(src: str | os.PathLike[str], dst: str | os.PathLike[str], rows: int = 65536) -> Path:
    """Rewrite `src` (e.g. np.savez_compressed output) as an uncompressed .npz at `dst`, streaming."""
    src_path, dst_path = Path(src), Path(dst)
    with zipfile.ZipFile(src_path) as zin:
        headers: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for key in EXTRA_KEYS:
            try:
                with zin.open(f"{key}.npy") as m:
                    shape, _, dtype = _read_npy_header(m, key, src_path)
            except KeyError:
                raise DataError(f"{src_path}: no `{key}` array; {FORMAT_HELP}") from None
            headers[key] = (shape, dtype)
        (ishape, idtype), (lshape, _) = headers["image"], headers["label"]
        if idtype != np.uint8 or len(ishape) != 4 or lshape != ishape[:1]:
            raise DataError(f"{src_path}: `image` {idtype} {ishape} / `label` {lshape}; {FORMAT_HELP}")
        with zin.open("label.npy") as m:
            _read_npy_header(m, "label", src_path)
            labels = np.concatenate(list(_chunks_of(m, headers["label"][1], lshape, 1 << 22)))
        with NpzWriter(dst_path, ishape[0], ishape[1:]) as out, zin.open("image.npy") as m:
            _read_npy_header(m, "image", src_path)
            at = 0
            for chunk in _chunks_of(m, idtype, ishape, rows):
                out.write(chunk, labels[at : at + chunk.shape[0]])
                at += chunk.shape[0]
    return dst_path


def _main(argv: Iterable[str]) -> int:
    args = list(argv)
    if len(args) != 3 or args[0] != "convert":
        print("usage: python -m robust_train.data.extra convert IN.npz OUT.npz", file=sys.stderr)
        return 2
    try:
        out = convert_npz(args[1], args[2])
    except (DataError, OSError, zipfile.BadZipFile) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
