"""Writers of tiny dataset files in the real on-disk formats, and a network that always fails."""

from __future__ import annotations

import pickle
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every urlopen (torchvision's downloads go through it) fails; returns the URLs that were tried."""
    tried: list[str] = []

    def refuse(request, *args, **kwargs):
        tried.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tried


def random_images(rng: np.random.Generator, n: int, c: int = 3, h: int = 32, w: int = 32) -> np.ndarray:
    """(N, C, H, W) uint8 random images (distinct with overwhelming probability)."""
    return rng.integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def _dump(path: Path, obj: dict) -> None:
    # Protocol 2 and latin-1-decodable strings, as the original Python 2 pickles load.
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """<root>/cifar-10-batches-py/: data_batch_1..5, test_batch, batches.meta (rows: 1024 R, G, B)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x = random_images(rng, 5 * per_batch)
    train_y = rng.integers(0, 10, size=5 * per_batch)
    test_x = random_images(rng, n_test)
    test_y = rng.integers(0, 10, size=n_test)
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        _dump(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": [int(v) for v in train_y[sl]],
                "data": train_x[sl].reshape(per_batch, 3072),
                "filenames": [f"img_{b}_{i}.png" for i in range(per_batch)],
            },
        )
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": [int(v) for v in test_y],
            "data": test_x.reshape(n_test, 3072),
            "filenames": [f"test_{i}.png" for i in range(n_test)],
        },
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"num_cases_per_batch": per_batch, "label_names": names, "num_vis": 3072})
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 5, seed: int = 1) -> dict[str, np.ndarray]:
    """<root>/cifar-100-python/: train, test, meta (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = random_images(rng, n)
        fine = rng.integers(0, 100, size=n)
        fine[0] = 99  # the top label must survive
        _dump(
            folder / split,
            {
                "filenames": [f"{split}_{i}.png" for i in range(n)],
                "batch_label": f"{split} batch",
                "fine_labels": [int(v) for v in fine],
                "coarse_labels": [int(v) // 5 for v in fine],
                "data": x.reshape(n, 3072),
            },
        )
        out[f"{split}_x"], out[f"{split}_y"] = x, fine
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"class{i}" for i in range(100)],
            "coarse_label_names": [f"super{i}" for i in range(20)],
        },
    )
    return out


def write_svhn(folder: Path, n_train: int = 12, n_test: int = 6, seed: int = 2) -> dict[str, np.ndarray]:
    """<folder>/{train,test}_32x32.mat: X (32, 32, 3, N) uint8, y (N, 1) with 10 meaning digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = random_images(rng, n)
        digits = np.arange(n) % 10  # every digit, including 0, appears
        y_file = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        savemat(
            folder / f"{split}_32x32.mat", {"X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)), "y": y_file}
        )
        out[f"{split}_x"], out[f"{split}_y"] = x, digits
    return out


TINY_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def write_tiny_imagenet(root: Path, per_class: int = 3, n_val: int = 6) -> dict:
    """<root>/tiny-imagenet-200/: wnids.txt, train/<wnid>/images/*.JPEG (+ boxes), val/images, annotations.

    Each class has its own flat colour so that labels can be checked through JPEG compression; one
    training image is grayscale (as some real ones are).
    """
    from PIL import Image

    base = root / "tiny-imagenet-200"
    wnids = ["n03444034", "n01443537", "n09999999"]  # deliberately not sorted
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    for wnid, colour in zip(wnids, TINY_COLOURS):
        images = base / "train" / wnid / "images"
        images.mkdir(parents=True)
        boxes = []
        for i in range(per_class):
            Image.new("RGB", (64, 64), colour).save(images / f"{wnid}_{i}.JPEG", quality=95)
            boxes.append(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(boxes))
    Image.new("L", (64, 64), 128).save(base / "train" / wnids[0] / "images" / f"{wnids[0]}_gray.JPEG")
    lines, val_wnids = [], []
    for i in range(n_val):
        wnid = wnids[(i * 2) % len(wnids)]
        Image.new("RGB", (64, 64), TINY_COLOURS[wnids.index(wnid)]).save(
            base / "val" / "images" / f"val_{i}.JPEG", quality=95
        )
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63\n")
        val_wnids.append(wnid)
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return {"wnids": wnids, "val_wnids": val_wnids, "per_class": per_class}


def write_extra_npz(
    path: Path,
    n: int,
    seed: int = 0,
    hwc: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    label_dtype: type = np.int64,
    compressed: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """An .npz in the DM-Improves-AT format: uint8 `image` (N, H, W, C) and integer `label` (N,),
    written by np.savez (or np.savez_compressed) as the authors' files are. Returns (images, labels)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, *hwc), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n).astype(label_dtype)
    (np.savez_compressed if compressed else np.savez)(path, image=images, label=labels)
    return images, labels


def image_table(x: np.ndarray | torch.Tensor, y) -> dict[bytes, int]:
    """image bytes -> label, to match loaded images with written ones whatever their order."""
    x = x.numpy() if isinstance(x, torch.Tensor) else x
    y = y.tolist() if hasattr(y, "tolist") else list(y)
    return {x[i].tobytes(): int(y[i]) for i in range(len(y))}


@pytest.fixture
def fmt() -> SimpleNamespace:
    """The writers above, for tests (conftest modules are not imported by name)."""
    return SimpleNamespace(
        write_cifar10=write_cifar10,
        write_cifar100=write_cifar100,
        write_svhn=write_svhn,
        write_tiny_imagenet=write_tiny_imagenet,
        write_extra_npz=write_extra_npz,
        image_table=image_table,
        random_images=random_images,
        tiny_colours=TINY_COLOURS,
    )
