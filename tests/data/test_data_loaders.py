"""Each file-backed loader reads tiny files written in the real on-disk format; missing files fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robust_train.data import DATASET_NAMES, DataBundle, build_dataset
from robust_train.errors import ConfigError, DataError


def _cfg(name: str, root, **extra) -> dict:
    return {"name": name, "root": str(root), "download": False, "check_integrity": False, **extra}


def _check_bundle(b: DataBundle, shape: tuple[int, int, int]) -> None:
    for x, y in ((b.train_x, b.train_y), (b.val_x, b.val_y), (b.test_x, b.test_y)):
        assert x.dtype == torch.uint8 and x.is_contiguous() and tuple(x.shape[1:]) == shape
        assert y.dtype == torch.int64 and y.shape == (x.shape[0],)
    assert b.image_shape == shape


def _assert_same_images(fmt, loaded_x, loaded_y, written_x, written_y) -> None:
    """Loaded (train + val) images are exactly the written ones, each with its own label."""
    written = fmt.image_table(written_x, written_y)
    loaded = fmt.image_table(loaded_x, loaded_y)
    assert loaded == written


def test_dataset_names():
    assert DATASET_NAMES == (
        "cifar10", "cifar100", "svhn", "tiny_imagenet", "mnist5k", "synthetic", "image_folder",
    )  # fmt: skip


def test_unknown_name_is_a_config_error():
    with pytest.raises(
        ConfigError, match=r"dataset.name='imagenet' is not a known dataset; allowed: cifar10"
    ):
        build_dataset({"name": "imagenet"}, seed=0)


def test_cifar10_reads_python_pickles(tmp_path, fmt):
    w = fmt.write_cifar10(tmp_path)
    b = build_dataset(_cfg("cifar10", tmp_path, val_size=3), seed=0)
    _check_bundle(b, (3, 32, 32))
    assert (len(b.train_y), len(b.val_y), len(b.test_y)) == (17, 3, 5)
    assert b.num_classes == 10 and b.mean == (0.4914, 0.4822, 0.4465) and b.std == (0.2471, 0.2435, 0.2616)
    _assert_same_images(
        fmt, torch.cat([b.train_x, b.val_x]), torch.cat([b.train_y, b.val_y]), w["train_x"], w["train_y"]
    )
    # The test set keeps file order, and the CHW layout of each 3072-byte row.
    assert torch.equal(b.test_x, torch.from_numpy(w["test_x"]))
    assert b.test_y.tolist() == w["test_y"].tolist()


def test_cifar100_reads_fine_labels(tmp_path, fmt):
    w = fmt.write_cifar100(tmp_path)
    b = build_dataset(_cfg("cifar100", tmp_path, val_size=2), seed=0)
    _check_bundle(b, (3, 32, 32))
    assert b.num_classes == 100 and b.mean[0] == pytest.approx(0.5070751592371323)
    _assert_same_images(
        fmt, torch.cat([b.train_x, b.val_x]), torch.cat([b.train_y, b.val_y]), w["train_x"], w["train_y"]
    )
    assert torch.equal(b.test_x, torch.from_numpy(w["test_x"]))
    assert b.test_y.tolist() == w["test_y"].tolist()


def test_svhn_reads_mat_files_and_maps_label_10_to_0(tmp_path, fmt):
    w = fmt.write_svhn(tmp_path / "svhn")
    b = build_dataset(_cfg("svhn", tmp_path, val_size=2), seed=0)
    _check_bundle(b, (3, 32, 32))
    assert b.num_classes == 10
    all_y = torch.cat([b.train_y, b.val_y])
    assert sorted(all_y.tolist()) == sorted(w["train_y"].tolist()) and 10 not in all_y.tolist()
    _assert_same_images(fmt, torch.cat([b.train_x, b.val_x]), all_y, w["train_x"], w["train_y"])
    assert torch.equal(b.test_x, torch.from_numpy(w["test_x"]))
    assert b.test_y.tolist() == w["test_y"].tolist() and 0 in b.test_y.tolist()


def test_tiny_imagenet_reads_folders_and_val_annotations(tmp_path, fmt):
    w = fmt.write_tiny_imagenet(tmp_path)
    b = build_dataset(_cfg("tiny_imagenet", tmp_path, val_size=2), seed=0)
    _check_bundle(b, (3, 64, 64))
    assert b.num_classes == 3
    assert len(b.train_y) + len(b.val_y) == 3 * w["per_class"] + 1 and len(b.test_y) == len(w["val_wnids"])
    order = sorted(w["wnids"])  # class index = position among the sorted wnids
    colours = {order.index(wnid): colour for wnid, colour in zip(w["wnids"], fmt.tiny_colours)}
    gray_class = order.index(w["wnids"][0])
    for x, y in ((b.train_x, b.train_y), (b.val_x, b.val_y), (b.test_x, b.test_y)):
        for img, label in zip(x, y.tolist()):
            mean_colour = img.double().mean(dim=(1, 2))
            is_colour = torch.allclose(mean_colour, torch.tensor(colours[label], dtype=torch.float64), atol=3)
            is_gray = label == gray_class and torch.allclose(
                mean_colour, torch.full((3,), 128.0, dtype=torch.float64), atol=3
            )
            assert is_colour or is_gray, (label, mean_colour)
    assert b.test_y.tolist() == [order.index(wnid) for wnid in w["val_wnids"]]


@pytest.mark.parametrize(
    ("name", "layout_bit"),
    [
        ("cifar10", "cifar-10-batches-py/ holding data_batch_1"),
        ("cifar100", "cifar-100-python/ holding train, test, meta"),
        ("svhn", "svhn/ holding train_32x32.mat and test_32x32.mat"),
        ("tiny_imagenet", "tiny-imagenet-200/ holding wnids.txt, train/<wnid>/images/*.JPEG"),
    ],
)
@pytest.mark.parametrize("download", [False, True])
def test_missing_files_name_path_layout_and_fix(tmp_path, no_network, name, layout_bit, download):
    root = tmp_path / "nowhere"
    cfg = {"name": name, "root": str(root), "download": download, "check_integrity": True}
    with pytest.raises(DataError) as info:
        build_dataset(cfg, seed=0)
    msg = str(info.value)
    assert str(root) in msg and layout_bit in msg and "dataset.root=/path/to/dir" in msg
    if download:
        assert "failed: URLError" in msg and "network is unreachable (test)" in msg
        assert len(no_network) >= 1  # it did try, through torchvision's downloader
    else:
        assert "dataset.download=false" in msg and no_network == []
    assert "\n" not in msg


def test_partial_cifar_files_count_as_missing(tmp_path, fmt, no_network):
    fmt.write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="files not found"):
        build_dataset(_cfg("cifar10", tmp_path), seed=0)


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_integrity_check_rejects_unofficial_files(tmp_path, fmt, name):
    if name == "cifar10":
        fmt.write_cifar10(tmp_path)
    else:
        fmt.write_svhn(tmp_path / "svhn")
    cfg = _cfg(name, tmp_path, check_integrity=True)
    with pytest.raises(DataError, match="check_integrity=false"):
        build_dataset(cfg, seed=0)


def test_corrupt_pickle_is_a_data_error(tmp_path, fmt):
    fmt.write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="could not read"):
        build_dataset(_cfg("cifar10", tmp_path), seed=0)


def test_tiny_imagenet_wnids_must_match_folders(tmp_path, fmt):
    fmt.write_tiny_imagenet(tmp_path)
    (tmp_path / "tiny-imagenet-200" / "wnids.txt").write_text("n03444034\nn01443537\n")
    with pytest.raises(DataError, match="do not match wnids.txt"):
        build_dataset(_cfg("tiny_imagenet", tmp_path), seed=0)


def test_declared_num_classes_must_match(tmp_path, fmt):
    fmt.write_tiny_imagenet(tmp_path)
    with pytest.raises(ConfigError, match="dataset.num_classes=200"):
        build_dataset(_cfg("tiny_imagenet", tmp_path, num_classes=200, val_size=1), seed=0)


def test_root_defaults_to_env_variable(tmp_path, fmt, monkeypatch):
    fmt.write_cifar10(tmp_path)
    monkeypatch.setenv("ROBUST_TRAIN_DATA", str(tmp_path))
    b = build_dataset({"name": "cifar10", "check_integrity": False, "download": False, "val_size": 1}, seed=0)
    assert len(b.train_y) == 19


def test_synthetic_shapes_and_determinism():
    cfg = {"name": "synthetic", "image_shape": [1, 8, 12], "num_classes": 7, "train_size": 50, "test_size": 9,
           "val_size": 5}  # fmt: skip
    a, b = build_dataset(cfg, seed=3), build_dataset(cfg, seed=3)
    _check_bundle(a, (1, 8, 12))
    assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (45, 5, 9)
    assert a.num_classes == 7 and a.mean == (0.5,) and a.std == (0.25,)
    for key in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, key), getattr(b, key))
    assert int(a.train_y.max()) < 7 and int(a.train_y.min()) >= 0
    c = build_dataset(cfg, seed=4)
    assert not torch.equal(a.test_x, c.test_x)
    # Enough pixels that all byte values should show up: it is uniform uint8, not a float in disguise.
    assert len(np.unique(a.train_x.numpy())) > 200


@pytest.mark.parametrize(
    ("key", "value"),
    [("image_shape", [3, 32]), ("num_classes", 1), ("train_size", 0), ("test_size", "many")],
)
def test_synthetic_bad_config(key, value):
    cfg = {"name": "synthetic", "train_size": 20, "test_size": 4, "val_size": 2, key: value}
    with pytest.raises(ConfigError, match=f"dataset.{key}"):
        build_dataset(cfg, seed=0)
