"""Loaders for the datasets that live in files: CIFAR-10, CIFAR-100, SVHN (torchvision) and Tiny-ImageNet.

Each checks for its files under the data root, downloads them with torchvision's helpers when they
are absent (and `dataset.download` is true), and turns every failure into a DataError that says
where it looked, what it expected and how to fix it. torchvision is imported lazily: it is slow to
import and the embedded dataset does not need it.
"""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robust_train.data.sources import (
    FileDatasetConfig,
    Source,
    data_root,
    labels_to_tensor,
    missing_files_error,
    nhwc_to_tensor,
    one_line,
)
from robust_train.errors import DataError
from robust_train.registry import DATASETS

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
CIFAR100_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)
SVHN_MEAN = (0.4377, 0.4438, 0.4728)
SVHN_STD = (0.1980, 0.2010, 0.1970)
TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2770, 0.2691, 0.2821)

SVHN_SUBDIR = "svhn"
TINY_FOLDER = "tiny-imagenet-200"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"

# Errors that mean "the file is there but is not what it should be".
_READ_ERRORS = (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, OSError, IndexError)


def _tv_utils() -> Any:
    # Looked up at call time so that tests (and users) can patch the download helpers.
    import torchvision.datasets.utils as utils

    return utils


def _integrity_error(name: str, where: Path, exc: BaseException) -> DataError:
    return DataError(
        f"dataset {name!r}: the files under {where} failed torchvision's check ({one_line(exc)}): they are "
        f"corrupt, truncated or not the official release. Delete them to download again, or set "
        f"dataset.check_integrity=false to skip the MD5 check for files you trust."
    )


def _unreadable_error(name: str, where: Path, exc: BaseException) -> DataError:
    return DataError(f"dataset {name!r}: could not read the files under {where}: {one_line(exc)}")


def _ensure_files(
    name: str,
    root: Path,
    searched: Path,
    required: list[Path],
    layout: str,
    download: bool,
    url: str,
    fetch: Any,
) -> None:
    """Download when any required path is absent; raise a DataError if they are still absent."""
    if all(p.exists() for p in required):
        return
    if not download:
        raise missing_files_error(name, root, searched, layout, False, url, None)
    try:
        fetch()
    except Exception as exc:  # any network / disk / archive failure becomes one clear message
        raise missing_files_error(name, root, searched, layout, True, url, one_line(exc)) from exc
    still_missing = [str(p) for p in required if not p.exists()]
    if still_missing:
        raise DataError(
            f"dataset {name!r}: the download from {url} finished but {', '.join(still_missing)} is still "
            f"missing. Expected layout: {layout}."
        )


# --------------------------------------------------------------------------- CIFAR


def _cifar_class(which: str, check_integrity: bool) -> Any:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if which == "cifar10" else CIFAR100
    if check_integrity:
        return base

    # torchvision's check_integrity(path, md5=None) only tests that the file exists.
    class Unchecked(base):  # type: ignore[misc, valid-type]
        train_list = [[fname, None] for fname, _ in base.train_list]
        test_list = [[fname, None] for fname, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    Unchecked.__name__ = f"Unchecked{base.__name__}"
    return Unchecked


def _load_cifar(which: str, cfg: FileDatasetConfig) -> Source:
    root = data_root(cfg)
    download = cfg.download
    cls = _cifar_class(which, cfg.check_integrity)
    folder = root / cls.base_folder
    files = [fname for fname, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    layout = (
        f"<root>/{cls.base_folder}/ holding {', '.join(files)} (the python version, {cls.filename} extracted)"
    )

    def fetch() -> None:
        _tv_utils().download_and_extract_archive(cls.url, str(root), filename=cls.filename, md5=cls.tgz_md5)

    _ensure_files(which, root, folder, [folder / f for f in files], layout, download, cls.url, fetch)
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
    except RuntimeError as exc:
        raise _integrity_error(which, folder, exc) from exc
    except _READ_ERRORS as exc:
        raise _unreadable_error(which, folder, exc) from exc

    num_classes = 10 if which == "cifar10" else 100
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if which == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return Source(
        train_x=nhwc_to_tensor(train.data),
        train_y=labels_to_tensor(train.targets, num_classes, f"dataset {which!r} train"),
        test_x=nhwc_to_tensor(test.data),
        test_y=labels_to_tensor(test.targets, num_classes, f"dataset {which!r} test"),
        num_classes=num_classes,
        mean=mean,
        std=std,
        default_val_size=1000,
    )


@DATASETS.register("cifar10", schema=FileDatasetConfig)
def load_cifar10(cfg: FileDatasetConfig, seed: int) -> Source:
    """CIFAR-10 from <root>/cifar-10-batches-py/."""
    return _load_cifar("cifar10", cfg)


@DATASETS.register("cifar100", schema=FileDatasetConfig)
def load_cifar100(cfg: FileDatasetConfig, seed: int) -> Source:
    """CIFAR-100 (fine labels) from <root>/cifar-100-python/."""
    return _load_cifar("cifar100", cfg)


# --------------------------------------------------------------------------- SVHN


def _svhn_class(check_integrity: bool) -> Any:
    from torchvision.datasets import SVHN

    if check_integrity:
        return SVHN

    class UncheckedSVHN(SVHN):
        split_list = {split: [url, fname, None] for split, (url, fname, _) in SVHN.split_list.items()}

    return UncheckedSVHN


@DATASETS.register("svhn", schema=FileDatasetConfig)
def load_svhn(cfg: FileDatasetConfig, seed: int) -> Source:
    """SVHN (cropped digits, train + test; label 10 means digit 0) from <root>/svhn/."""
    root = data_root(cfg)
    download = cfg.download
    cls = _svhn_class(cfg.check_integrity)
    folder = root / SVHN_SUBDIR
    splits = {s: cls.split_list[s] for s in ("train", "test")}
    layout = f"<root>/{SVHN_SUBDIR}/ holding train_32x32.mat and test_32x32.mat (format 2, cropped digits)"

    def fetch() -> None:
        for url, fname, md5 in splits.values():
            if not (folder / fname).exists():
                _tv_utils().download_url(url, str(folder), fname, md5)

    urls = " and ".join(url for url, _, _ in splits.values())
    _ensure_files(
        "svhn", root, folder, [folder / f for _, f, _ in splits.values()], layout, download, urls, fetch
    )
    try:
        train, test = cls(str(folder), split="train"), cls(str(folder), split="test")
    except RuntimeError as exc:
        raise _integrity_error("svhn", folder, exc) from exc
    # scipy.io.loadmat signals a MATLAB v7.3 (HDF5) file, which it cannot read, with NotImplementedError.
    except (*_READ_ERRORS, NotImplementedError) as exc:
        raise _unreadable_error("svhn", folder, exc) from exc

    # torchvision already maps label 10 -> 0 and transposes X (H, W, C, N) to (N, C, H, W).
    def images(ds: Any) -> torch.Tensor:
        data = np.asarray(ds.data)
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1] != 3:
            raise DataError(
                f"dataset 'svhn': X in {folder} must be uint8 HxWx3xN, got {data.dtype} {data.shape}"
            )
        return torch.from_numpy(np.ascontiguousarray(data))

    return Source(
        train_x=images(train),
        train_y=labels_to_tensor(train.labels, 10, "dataset 'svhn' train"),
        test_x=images(test),
        test_y=labels_to_tensor(test.labels, 10, "dataset 'svhn' test"),
        num_classes=10,
        mean=SVHN_MEAN,
        std=SVHN_STD,
        default_val_size=1000,
    )


# --------------------------------------------------------------------------- Tiny-ImageNet


def _decode_images(paths: list[str], size: tuple[int, int], name: str) -> np.ndarray:
    """Decode image files into one (N, H, W, 3) uint8 array (RGB; grayscale files are converted)."""
    from PIL import Image

    out = np.empty((len(paths), size[0], size[1], 3), dtype=np.uint8)

    def decode(i: int) -> None:
        with Image.open(paths[i]) as img:
            arr = np.asarray(img.convert("RGB"))
        if arr.shape[:2] != size:
            raise DataError(
                f"dataset {name!r}: {paths[i]} is {arr.shape[1]}x{arr.shape[0]}, expected {size[1]}x{size[0]}"
            )
        out[i] = arr

    # PIL releases the GIL while decoding, so threads give a real speed-up on 100k small JPEGs.
    workers = min(8, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(decode, range(len(paths)), chunksize=256):
                pass
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"dataset {name!r}: could not decode an image: {one_line(exc)}") from exc
    return out


def _read_val_annotations(path: Path) -> list[tuple[str, str]]:
    """(file name, wnid) pairs from val_annotations.txt (tab-separated: file, wnid, bounding box)."""
    pairs = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise DataError(
                f"dataset 'tiny_imagenet': {path} line {lineno} has no '<file>\\t<wnid>' pair: {line!r}"
            )
        pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


@DATASETS.register("tiny_imagenet", schema=FileDatasetConfig)
def load_tiny_imagenet(cfg: FileDatasetConfig, seed: int) -> Source:
    """Tiny-ImageNet-200 from <root>/tiny-imagenet-200/; the labelled `val` split serves as the test set.

    Class indices follow the sorted wnids (torchvision ImageFolder's order).
    """
    root = data_root(cfg)
    download = cfg.download
    check = cfg.check_integrity
    base = root / TINY_FOLDER
    layout = (
        f"<root>/{TINY_FOLDER}/ holding wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
        f"val/val_annotations.txt (tiny-imagenet-200.zip extracted)"
    )
    required = [
        base / "wnids.txt",
        base / "train",
        base / "val" / "images",
        base / "val" / "val_annotations.txt",
    ]

    def fetch() -> None:
        _tv_utils().download_and_extract_archive(
            TINY_URL,
            str(root),
            filename="tiny-imagenet-200.zip",
            md5=TINY_MD5 if check else None,
            remove_finished=True,
        )

    _ensure_files("tiny_imagenet", root, base, required, layout, download, TINY_URL, fetch)

    from torchvision.datasets import ImageFolder

    try:
        wnids = [w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()]
        train = ImageFolder(str(base / "train"))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(
            f"dataset 'tiny_imagenet': could not list the training images under {base / 'train'} "
            f"({one_line(exc)}). Expected layout: {layout}."
        ) from exc
    if set(wnids) != set(train.classes):
        extra = sorted(set(train.classes) - set(wnids))[:5]
        absent = sorted(set(wnids) - set(train.classes))[:5]
        raise DataError(
            f"dataset 'tiny_imagenet': the class folders in {base / 'train'} do not match wnids.txt "
            f"(folders not in wnids.txt: {extra}; wnids without a folder: {absent})"
        )

    val_pairs = _read_val_annotations(base / "val" / "val_annotations.txt")
    unknown = sorted({w for _, w in val_pairs} - set(train.class_to_idx))
    if unknown:
        raise DataError(
            f"dataset 'tiny_imagenet': val_annotations.txt names wnids not in wnids.txt: {unknown[:5]}"
        )
    val_paths = [str(base / "val" / "images" / f) for f, _ in val_pairs]
    absent_files = [p for p in val_paths if not os.path.isfile(p)]
    if absent_files:
        raise DataError(
            f"dataset 'tiny_imagenet': {len(absent_files)} images listed in val_annotations.txt are missing, "
            f"e.g. {absent_files[0]}"
        )

    size = (64, 64)
    num_classes = len(train.classes)
    return Source(
        train_x=nhwc_to_tensor(_decode_images([p for p, _ in train.samples], size, "tiny_imagenet")),
        train_y=torch.tensor([t for _, t in train.samples], dtype=torch.int64),
        test_x=nhwc_to_tensor(_decode_images(val_paths, size, "tiny_imagenet")),
        test_y=torch.tensor([train.class_to_idx[w] for _, w in val_pairs], dtype=torch.int64),
        num_classes=num_classes,
        mean=TINY_MEAN,
        std=TINY_STD,
        default_val_size=1000,
    )
