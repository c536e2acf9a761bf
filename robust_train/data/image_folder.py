"""image_folder: a folder of labelled image files as a test set, without converting it first.

Two layouts, for the test split (`root`, `csv`) and an optional training split (`train_root`,
`train_csv`):

- class sub-folders: `<root>/<class name>/**/*.png|jpg|jpeg|bmp|gif|webp|tif|tiff|ppm|pgm` (hidden files
  and folders are skipped). Labels follow the sorted class names (torchvision ImageFolder's order), or
  the order of `classes` when given.
- a CSV of `file,label` rows (an optional `file,label` header): `file` relative to `root` (or to the
  CSV's folder when `root` is null), `label` an integer or a class name (names map through `classes`,
  else through their sorted order).

Every image must have the size of `image_shape` (C, H, W; null: the size of the first image, RGB);
`resize: true` resizes instead (bilinear). Images are decoded once into uint8 tensors, like every other
dataset. Without a training split the dataset serves robust-eval only; robust-train refuses it.
`mean`/`std` null: computed from the training split (else the test split). When robust-eval evaluates a
trained model on a folder, the model's own statistics come with the checkpoint's dataset node.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from robust_train.data.sources import FileDatasetConfig, Source, nhwc_to_tensor, one_line
from robust_train.errors import DataError
from robust_train.registry import DATASETS
from robust_train.schema import Flag

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_MODES = {1: "L", 3: "RGB"}
_NAME = "dataset 'image_folder'"


class ImageFolderConfig(FileDatasetConfig):
    """`dataset=image_folder`: labelled image files as the test set (and optionally a training split).

    `download` and `check_integrity` are accepted (so a trained run's dataset node can be laid over by
    robust-eval) and ignored: there is nothing to download.
    """

    # The test images: a folder of class sub-folders, or the folder that `csv`'s paths are relative to.
    root: str | None = None
    # A CSV of `file,label` rows listing the test images; null: the class sub-folders of `root`.
    csv: str | None = None
    # An optional training split, in either layout; without one only robust-eval can use the dataset.
    train_root: str | None = None
    train_csv: str | None = None
    # Class names in label order (e.g. the ten CIFAR-10 names); the folders or CSV names may be a subset.
    # null: the sorted names found (or integer labels as written).
    classes: list[str] | None = None
    # Resize images of another size to image_shape (bilinear) instead of refusing them.
    resize: Flag = False
    download: Flag = False

    def check(self, path: str) -> list[str]:
        problems = super().check(path)
        if self.root is None and self.csv is None:
            problems.append(
                f"{path}.root is required for dataset=image_folder: a folder of class sub-folders "
                f"(or set {path}.csv to a CSV of file,label rows)"
            )
        if self.resize and self.image_shape is None:
            problems.append(f"{path}.resize=true needs {path}.image_shape=[channels, height, width]")
        if self.image_shape is not None and self.image_shape[0] not in _MODES:
            problems.append(
                f"{path}.image_shape={list(self.image_shape)}: image_folder reads 1 (grayscale) or 3 (RGB) "
                "channels"
            )
        if self.classes is not None:
            if len(set(self.classes)) != len(self.classes) or not self.classes:
                problems.append(f"{path}.classes must be a non-empty list of distinct names")
            elif self.num_classes is not None and self.num_classes != len(self.classes):
                problems.append(
                    f"{path}.num_classes={self.num_classes} but {path}.classes names {len(self.classes)}"
                )
        return problems

    def training_problems(self, path: str) -> list[str]:
        problems = super().training_problems(path)
        if self.train_root is None and self.train_csv is None:
            problems.insert(
                0,
                f"dataset=image_folder has no training split ({path}.train_root or {path}.train_csv): "
                "it is a test set for robust-eval, e.g. robust-eval checkpoint=RUN/best.pt "
                "dataset.name=image_folder dataset.root=FOLDER",
            )
        return problems


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _from_folders(root: Path, key: str) -> list[tuple[Path, str]]:
    if not root.is_dir():
        raise DataError(f"{_NAME}: {key}={root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        loose = sum(1 for p in root.iterdir() if _is_image(p))
        raise DataError(
            f"{_NAME}: {key}={root} has no class sub-folders ({loose} images directly in it); put the images "
            "in one folder per class, or list them with labels in a CSV (dataset.csv)"
        )
    items: list[tuple[Path, str]] = []
    for d in class_dirs:
        files = sorted(
            p
            for p in d.rglob("*")
            if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(d).parts)
        )
        if not files:
            raise DataError(
                f"{_NAME}: class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "remove it or add images"
            )
        items += [(p, d.name) for p in files]
    return items


def _from_csv(csv_path: Path, root: Path | None, key: str) -> list[tuple[Path, str]]:
    if not csv_path.is_file():
        raise DataError(f"{_NAME}: {key}={csv_path} does not exist; give a CSV of file,label rows")
    base = root if root is not None else csv_path.parent
    items: list[tuple[Path, str]] = []
    with open(csv_path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 2:
                raise DataError(
                    f"{_NAME}: {csv_path} line {lineno} has {len(row)} fields; expected file,label: {row!r}"
                )
            file, label = row[0].strip(), row[1].strip()
            if lineno == 1 and label.lower() == "label" and file.lower() in ("file", "path", "filename"):
                continue  # header
            path = Path(file) if Path(file).is_absolute() else base / file
            if not path.is_file():
                raise DataError(f"{_NAME}: {csv_path} line {lineno}: {path} does not exist")
            items.append((path, label))
    if not items:
        raise DataError(f"{_NAME}: {key}={csv_path} lists no images")
    return items


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _labels(
    splits: list[list[tuple[Path, str]]], cfg: ImageFolderConfig, where: str
) -> tuple[list[np.ndarray], int]:
    """Label tokens (class names or integers) -> int64 labels per split, and the number of classes."""
    tokens = [t for items in splits for _, t in items]
    if cfg.classes is not None:
        index = {name: i for i, name in enumerate(cfg.classes)}
        unknown = sorted({t for t in tokens if t not in index and not _is_int(t)})
        if unknown:
            raise DataError(
                f"{_NAME}: {where} has labels {unknown[:5]} that are not in dataset.classes "
                f"({', '.join(cfg.classes[:10])}{', ...' if len(cfg.classes) > 10 else ''})"
            )
        num_classes = len(cfg.classes)
    elif all(_is_int(t) for t in tokens):
        index = {}
        num_classes = cfg.num_classes or max(int(t) for t in tokens) + 1
    else:
        names = sorted(set(tokens))
        if cfg.num_classes is not None and cfg.num_classes != len(names):
            raise DataError(
                f"{_NAME}: {where} has {len(names)} classes ({', '.join(names[:10])}) but "
                f"dataset.num_classes={cfg.num_classes}; list the model's classes in label order with "
                "dataset.classes=[...] (the folder may hold a subset)"
            )
        index = {name: i for i, name in enumerate(names)}
        num_classes = len(names)
    out = []
    for items in splits:
        y = np.array([index[t] if t in index else int(t) for _, t in items], dtype=np.int64)
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(
                f"{_NAME}: {where} has labels from {int(y.min())} to {int(y.max())}; "
                f"allowed: 0..{num_classes - 1}"
            )
        out.append(y)
    return out, num_classes


def _decode(paths: list[Path], shape: tuple[int, int, int], resize: bool, first: Path | None) -> np.ndarray:
    """Decode files into one (N, H, W, C) uint8 array; sizes other than `shape` are refused or resized."""
    from PIL import Image

    c, h, w = shape
    mode = _MODES[c]
    out = np.empty((len(paths), h, w, c), dtype=np.uint8)

    def one(i: int) -> None:
        with Image.open(paths[i]) as opened:
            img = opened.convert(mode)
            if img.size != (w, h):
                if not resize:
                    whence = f"the size of the first image, {first}" if first else "dataset.image_shape"
                    raise DataError(
                        f"{_NAME}: {paths[i]} is {img.size[0]}x{img.size[1]} (WxH) but the images must be "
                        f"{w}x{h} ({whence}); resize the files or set dataset.resize=true with "
                        f"dataset.image_shape=[{c}, H, W]"
                    )
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(img)
        out[i] = arr.reshape(h, w, c)

    workers = min(8, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(one, range(len(paths)), chunksize=64):
                pass
    except DataError:
        raise
    except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
        raise DataError(f"{_NAME}: could not decode an image: {one_line(exc)}") from exc
    return out


def _first_shape(path: Path) -> tuple[int, int, int]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
    except OSError as exc:
        raise DataError(f"{_NAME}: could not decode {path}: {one_line(exc)}") from exc
    return (3, h, w)


def _stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NHWC images, in [0, 1] units."""
    if x.shape[0] == 0:
        return (0.5,) * x.shape[-1], (0.25,) * x.shape[-1]
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(flat.std(axis=0), 1e-3)  # a constant channel would divide by zero
    return tuple(float(v) for v in flat.mean(axis=0)), tuple(float(v) for v in std)


def _split(root: str | None, csv_file: str | None, prefix: str) -> list[tuple[Path, str]]:
    base = Path(root).expanduser().absolute() if root is not None else None
    if csv_file is not None:
        return _from_csv(Path(csv_file).expanduser().absolute(), base, f"dataset.{prefix}csv")
    assert base is not None
    return _from_folders(base, f"dataset.{prefix}root")


@DATASETS.register("image_folder", schema=ImageFolderConfig)
def load_image_folder(cfg: ImageFolderConfig, seed: int) -> Source:
    """The test images (and the training split, when configured) decoded into uint8 tensors."""
    test = _split(cfg.root, cfg.csv, "")
    has_train = cfg.train_root is not None or cfg.train_csv is not None
    train = _split(cfg.train_root, cfg.train_csv, "train_") if has_train else []
    where = str(cfg.csv or cfg.root) + (f" and {cfg.train_csv or cfg.train_root}" if has_train else "")
    (test_y, *rest), num_classes = _labels([test, *([train] if has_train else [])], cfg, where)
    train_y = rest[0] if rest else np.empty(0, dtype=np.int64)

    first = None
    if cfg.image_shape is not None:
        c, h, w = cfg.image_shape
        shape = (c, h, w)
    else:
        first = (train or test)[0][0]
        shape = _first_shape(first)
    test_x = _decode([p for p, _ in test], shape, cfg.resize, first)
    train_x = _decode([p for p, _ in train], shape, cfg.resize, first)
    mean, std = _stats(train_x if len(train_x) else test_x)
    return Source(
        train_x=nhwc_to_tensor(train_x),
        train_y=torch.from_numpy(train_y),
        test_x=nhwc_to_tensor(test_x),
        test_y=torch.from_numpy(test_y),
        num_classes=num_classes,
        mean=mean,
        std=std,
        default_val_size=0.1 if len(train_y) >= 10 else 0,
    )
