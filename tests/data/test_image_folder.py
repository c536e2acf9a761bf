"""dataset=image_folder: class sub-folders or a CSV of file,label as a test set (and optional train split)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from robust_train.commands.train import train_run
from robust_train.data import build_dataset, check_training_data
from robust_train.errors import ConfigError, DataError

RUN = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval.checkpoints=[last]", "eval=quick",
    "eval.n_examples=8", "eval.sanity.enabled=false", "trainer.validation.pgd_steps=1",
    "defense.attack.steps=1",
]  # fmt: skip


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(path)


def write_folders(root: Path, per_class: dict[str, int], size=(32, 32), seed: int = 0) -> dict[bytes, str]:
    """PNG files (lossless) in one folder per class; returns pixels -> class name."""
    rng = np.random.default_rng(seed)
    table = {}
    for name, count in per_class.items():
        for i in range(count):
            pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
            write_image(root / name / f"img_{i}.png", pixels)
            table[pixels.transpose(2, 0, 1).tobytes()] = name
    return table


@pytest.fixture
def node(compose):
    def _node(*overrides: str):
        return compose(["logger=none", "dataset=image_folder", *overrides]).dataset

    return _node


def test_class_folders_are_labelled_by_sorted_name(tmp_path, node):
    # Created out of order, with a hidden file and a nested folder that must be read too.
    table = write_folders(tmp_path, {"cat": 2, "ant": 3, "bee": 1})
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"junk")
    write_image(tmp_path / "bee" / "more" / "x.png", np.full((32, 32, 3), 7, np.uint8))
    table[np.full((3, 32, 32), 7, np.uint8).tobytes()] = "bee"
    b = build_dataset(node(f"dataset.root={tmp_path}"), seed=0)
    assert b.num_classes == 3 and b.image_shape == (3, 32, 32)
    assert len(b.test_y) == 7 and len(b.train_y) == 0 and len(b.val_y) == 0
    names = ["ant", "bee", "cat"]
    for x, y in zip(b.test_x, b.test_y):
        assert names[int(y)] == table[x.numpy().tobytes()]
    # Statistics from the images themselves (no training split: the test images).
    x = b.test_x.double() / 255
    assert b.mean == pytest.approx(tuple(x.mean(dim=(0, 2, 3)).tolist()))


def test_csv_with_header_names_and_integers(tmp_path, node):
    write_image(tmp_path / "imgs" / "a.png", np.zeros((32, 32, 3), np.uint8))
    write_image(tmp_path / "imgs" / "b.png", np.full((32, 32, 3), 255, np.uint8))
    (tmp_path / "labels.csv").write_text("file,label\nimgs/a.png,3\nimgs/b.png,0\n")
    b = build_dataset(node(f"dataset.csv={tmp_path / 'labels.csv'}", "dataset.num_classes=10"), seed=0)
    assert b.test_y.tolist() == [3, 0] and b.num_classes == 10  # paths relative to the CSV's folder
    assert int(b.test_x[1].min()) == 255

    (tmp_path / "named.csv").write_text("a.png,dog\nb.png,cat\n")
    b = build_dataset(
        node(f"dataset.root={tmp_path / 'imgs'}", f"dataset.csv={tmp_path / 'named.csv'}"), seed=0
    )
    assert b.test_y.tolist() == [1, 0] and b.num_classes == 2  # names in sorted order: cat, dog


def test_classes_give_the_label_order_of_a_subset(tmp_path, node):
    write_folders(tmp_path, {"ship": 1, "cat": 1})
    cifar = "[airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck]"
    b = build_dataset(node(f"dataset.root={tmp_path}", f"dataset.classes={cifar}"), seed=0)
    assert b.num_classes == 10 and sorted(b.test_y.tolist()) == [3, 8]
    with pytest.raises(DataError, match=r"2 classes \(cat, ship\) but dataset\.num_classes=10; .*classes="):
        build_dataset(node(f"dataset.root={tmp_path}", "dataset.num_classes=10"), seed=0)


def test_other_sizes_are_refused_or_resized(tmp_path, node):
    write_folders(tmp_path, {"a": 1})
    write_image(tmp_path / "a" / "wide.png", np.zeros((30, 40, 3), np.uint8))
    with pytest.raises(DataError, match=r"wide\.png is 40x30 \(WxH\) but the images must be 32x32") as info:
        build_dataset(node(f"dataset.root={tmp_path}", "dataset.image_shape=[3,32,32]"), seed=0)
    assert "dataset.resize=true" in str(info.value) and "\n" not in str(info.value)
    b = build_dataset(
        node(f"dataset.root={tmp_path}", "dataset.image_shape=[3,16,16]", "dataset.resize=true"), seed=0
    )
    assert b.image_shape == (3, 16, 16) and len(b.test_y) == 2
    gray = build_dataset(
        node(f"dataset.root={tmp_path}", "dataset.image_shape=[1,8,8]", "dataset.resize=true"), seed=0
    )
    assert gray.image_shape == (1, 8, 8) and len(gray.mean) == 1


@pytest.mark.parametrize(
    "overrides,message",
    [
        ([], r"dataset\.root is required for dataset=image_folder"),
        (["dataset.root=X", "dataset.resize=true"], r"dataset\.resize=true needs dataset\.image_shape"),
        (["dataset.root=X", "dataset.image_shape=[2,8,8]"], r"reads 1 \(grayscale\) or 3 \(RGB\) channels"),
        (
            ["dataset.root=X", "dataset.classes=[a,a]"],
            r"dataset\.classes must be a non-empty list of distinct",
        ),
        (["dataset.root=X", "+dataset.clases=[a]"], r"dataset\.clases is not a known key; did you mean"),
    ],
)
def test_config_errors(compose, overrides, message):
    from robust_train.config import check_run

    problems = check_run(compose(["logger=none", "dataset=image_folder", *overrides]))
    assert any(re.search(message, p) for p in problems), problems


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda root: None, r"dataset\.root=\S+ is not a folder"),
        (
            lambda root: write_image(root / "loose.png", np.zeros((4, 4, 3), np.uint8)),
            r"no class sub-folders",
        ),
        (lambda root: (root / "empty").mkdir(parents=True), r"class folder \S+empty holds no images"),
    ],
)
def test_layout_errors_are_one_line(tmp_path, node, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=message) as info:
        build_dataset(node(f"dataset.root={root}"), seed=0)
    assert "\n" not in str(info.value)


def test_csv_errors(tmp_path, node):
    (tmp_path / "bad.csv").write_text("a.png,1,extra\n")
    with pytest.raises(DataError, match=r"bad\.csv line 1 has 3 fields; expected file,label"):
        build_dataset(node(f"dataset.csv={tmp_path / 'bad.csv'}"), seed=0)
    (tmp_path / "missing.csv").write_text("nothere.png,1\n")
    with pytest.raises(DataError, match=r"missing\.csv line 1: \S+nothere\.png does not exist"):
        build_dataset(node(f"dataset.csv={tmp_path / 'missing.csv'}"), seed=0)


def test_training_without_a_training_split_is_refused(compose, tmp_path):
    write_folders(tmp_path / "test", {"a": 1, "b": 1})
    cfg = compose([*RUN, "dataset=image_folder", f"dataset.root={tmp_path / 'test'}"])
    with pytest.raises(
        ConfigError, match=r"^dataset=image_folder has no training split .*robust-eval"
    ) as info:
        check_training_data(cfg.dataset)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="no training split"):
        train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_training_split_trains(compose, tmp_path):
    write_folders(tmp_path / "train", {"a": 12, "b": 12}, seed=1)
    write_folders(tmp_path / "test", {"a": 4, "b": 4}, seed=2)
    cfg = compose([
        *RUN, "dataset=image_folder", f"dataset.root={tmp_path / 'test'}",
        f"dataset.train_root={tmp_path / 'train'}", "model.width=0.0625", "dataset.val_size=4",
    ])  # fmt: skip
    res = train_run(cfg, tmp_path / "run")
    assert res["train"]["epochs_completed"] == 1
    assert res["eval"]["last"]["attacks"]["clean"]["n"] == 8


def test_robust_eval_of_a_trained_model_on_a_folder(compose, tmp_path):
    """The checkpoint's num_classes, image shape and normalization stay; the folder is the test set."""
    from robust_train.commands.evaluate import evaluate_checkpoint

    train_run(compose([*RUN]), tmp_path / "run")  # mnist5k, 10 classes
    folder = tmp_path / "digits"
    lines = []
    for i in range(6):
        write_image(folder / f"{i}.png", np.full((32, 32, 3), 40 * i, np.uint8))
        lines.append(f"{i}.png,{i}")
    (folder / "labels.csv").write_text("\n".join(lines))
    overrides = [
        f"checkpoint={tmp_path / 'run' / 'last.pt'}", "logger=none", "eval=quick",
        "eval.sanity.enabled=false", "dataset.name=image_folder", f"dataset.root={folder}",
        f"dataset.csv={folder / 'labels.csv'}",
    ]  # fmt: skip
    cfg = compose(overrides, config_name="evaluate")
    res = evaluate_checkpoint(cfg, tmp_path / "eval", overrides=overrides)
    assert res["config"]["dataset"]["name"] == "image_folder"
    assert res["config"]["dataset"]["mean"] == [0.1307] * 3  # the model's own (mnist5k) statistics
    assert res["eval"]["last"]["attacks"]["clean"]["n"] == 6
