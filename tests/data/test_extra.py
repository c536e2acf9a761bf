"""dataset.extra: DM-Improves-AT .npz files memory-mapped and streamed, mixed into training batches.

Every file here is written by np.savez / np.savez_compressed in the authors' format (uint8 `image`
N x H x W x C, integer `label`).
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_train.commands.train import train_run
from robust_train.data import check_training_data
from robust_train.data.extra import (
    ExtraData,
    ExtraFeed,
    ExtraSource,
    NpzWriter,
    _IndexStream,
    check_extra_files,
    convert_npz,
    default_epoch_steps,
    npz_members,
    plan_epoch,
)
from robust_train.errors import ConfigError, DataError
from robust_train.training.step import TrainStep

REPO = Path(__file__).resolve().parents[2]
RUN = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval.checkpoints=[last]", "eval=quick",
    "eval.n_examples=8", "eval.sanity.enabled=false", "dataset.train_limit=64", "trainer.batch_size=16",
    "trainer.max_batches=null", "trainer.validation.pgd_steps=1", "trainer.validation.max_examples=16",
    "defense.attack.steps=1",
]  # fmt: skip


def chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------------------- the archive


def test_members_are_located_where_numpy_reads_them(tmp_path, fmt):
    path = tmp_path / "a.npz"
    images, labels = fmt.write_extra_npz(path, 37, label_dtype=np.int32)
    members = npz_members(path)
    assert set(members) == {"image", "label"}
    raw = path.read_bytes()
    img, lab = members["image"], members["label"]
    assert img.shape == (37, 32, 32, 3) and img.dtype == np.uint8
    assert raw[img.offset : img.offset + img.nbytes] == images.tobytes()
    assert lab.dtype == np.int32 and raw[lab.offset : lab.offset + lab.nbytes] == labels.tobytes()


def test_gather_reads_rows_across_concatenated_files(tmp_path, fmt):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    xa, ya = fmt.write_extra_npz(a, 10, seed=1)
    xb, yb = fmt.write_extra_npz(b, 7, seed=2, label_dtype=np.uint8)
    data = ExtraData([a, str(b)])
    assert len(data) == 17 and data.image_shape == (3, 32, 32)
    x_all, y_all = np.concatenate([xa, xb]), np.concatenate([ya.astype(np.int64), yb.astype(np.int64)])
    idx = np.array([0, 3, 9, 10, 16])  # both files, both ends
    out_x = torch.empty(5, 3, 32, 32, dtype=torch.uint8)
    out_y = torch.empty(5, dtype=torch.int64)
    data.gather(idx, out_x, out_y)
    assert torch.equal(out_x, chw(x_all[idx])) and torch.equal(out_y, torch.from_numpy(y_all[idx]))
    data.release()  # pages dropped from the mapping: the next read faults them back in unchanged
    data.gather(idx[:2], out_x[:2], out_y[:2])
    assert torch.equal(out_x[:2], chw(x_all[idx[:2]]))
    data.close()


def test_streaming_writer_and_converter_write_the_format(tmp_path, fmt):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10)
    with NpzWriter(tmp_path / "w.npz", 10, (8, 8, 3)) as w:
        w.write(images[:4], labels[:4])
        w.write(images[4:], labels[4:])
    loaded = np.load(tmp_path / "w.npz")
    assert np.array_equal(loaded["image"], images) and np.array_equal(loaded["label"], labels)
    assert all(i.compress_type == zipfile.ZIP_STORED for i in zipfile.ZipFile(tmp_path / "w.npz").infolist())

    src = tmp_path / "c.npz"
    x, y = fmt.write_extra_npz(src, 9, compressed=True)
    convert_npz(src, tmp_path / "u.npz", rows=4)  # several chunks
    assert check_extra_files([str(tmp_path / "u.npz")], [3, 32, 32], 10) == []
    data = ExtraData([tmp_path / "u.npz"])
    out_x, out_y = torch.empty(9, 3, 32, 32, dtype=torch.uint8), torch.empty(9, dtype=torch.int64)
    data.gather(np.arange(9), out_x, out_y)
    assert torch.equal(out_x, chw(x)) and torch.equal(out_y, torch.from_numpy(y))
    data.close()


def test_streaming_does_not_load_the_file(tmp_path):
    """Neither anonymous memory (a load into RAM) nor mapped file pages (what the reader touched and did
    not give back) grow anywhere near the file's 94 MB while 60 batches stream."""
    n = 30_000
    with NpzWriter(tmp_path / "big.npz", n, (32, 32, 3)) as w:
        block = np.random.default_rng(0).integers(0, 256, size=(5000, 32, 32, 3), dtype=np.uint8)
        for _ in range(n // 5000):
            w.write(block, np.zeros(5000, dtype=np.int64))

    def rss_mb() -> dict[str, float]:
        text = Path("/proc/self/status").read_text()
        return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) / 1024 for k in ("RssAnon", "RssFile")}

    source = ExtraSource([tmp_path / "big.npz"], seed=0)
    before = rss_mb()
    gen = torch.Generator().manual_seed(0)
    plan = source.plan(0, n_train=100, batch_size=256, fraction=0.75, steps=60, generator=gen)
    feed = source.feed(plan.extra, torch.device("cpu"))
    for _ in range(60):  # 11,520 rows: with the fault-around window, nearly every page of the file
        feed.next()
    after = rss_mb()
    feed.close()
    assert after["RssAnon"] - before["RssAnon"] < 30, (before, after)
    assert after["RssFile"] - before["RssFile"] < 15, (before, after)
    source.close()


# ----------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    "case,expected",
    [
        ("missing", r"dataset\.extra=\S+/none\.npz does not exist"),
        ("compressed", r"`image` is compressed \(ZIP_DEFLATED\).*np\.savez \(not np\.savez_compressed\)"),
        ("no_label", r"no `label` array \(found: image, labels\)"),
        ("float", r"`image` is float32, expected uint8"),
        ("shape", r"holds 1x28x28 images .* dataset's images are 3x32x32"),
        ("labels", r"`label` ranges from 0 to 11; allowed: 0\.\.9 \(dataset\.num_classes=10\)"),
        ("count", r"`label` has 4 entries but `image` has 5 images"),
        ("fortran", r"`image` is stored in Fortran order"),
        ("not_zip", r"is not an \.npz \(zip\) archive"),
    ],
)
def test_bad_files_are_refused_with_one_line_naming_key_and_file(tmp_path, fmt, case, expected):
    path = tmp_path / "none.npz" if case == "missing" else tmp_path / f"{case}.npz"
    x = np.zeros((5, 32, 32, 3), dtype=np.uint8)
    y = np.zeros(5, dtype=np.int64)
    if case == "compressed":
        fmt.write_extra_npz(path, 5, compressed=True)
    elif case == "no_label":
        np.savez(path, image=x, labels=y)
    elif case == "float":
        np.savez(path, image=x.astype(np.float32), label=y)
    elif case == "shape":
        np.savez(path, image=np.zeros((5, 28, 28, 1), dtype=np.uint8), label=y)
    elif case == "labels":
        np.savez(path, image=x, label=np.array([0, 1, 2, 11, 3]))
    elif case == "count":
        np.savez(path, image=x, label=y[:4])
    elif case == "fortran":
        np.savez(path, image=np.asfortranarray(x), label=y)
    elif case == "not_zip":
        path.write_bytes(b"not a zip file at all")
    problems = check_extra_files([str(path)], [3, 32, 32], 10)
    assert len(problems) == 1 and "\n" not in problems[0], problems
    assert problems[0].startswith(f"dataset.extra={path}"), problems[0]
    assert re.search(expected, problems[0]), problems[0]


def test_a_preset_missing_mark_asks_for_the_files(compose, tmp_path):
    """sota presets write extra: ['???'] (a `???` merged over null would keep the null)."""
    problems = check_extra_files(["???"], [3, 32, 32], 10)
    assert problems == [
        "dataset.extra is required by this preset: set dataset.extra=/path/to/images.npz (a path or a list "
        "of DM-Improves-AT .npz files)"
    ]
    cfg = compose([*RUN, "dataset.extra=[???]"])
    with pytest.raises(ConfigError, match=r"^dataset\.extra is required by this preset"):
        train_run(cfg, tmp_path / "run")


def test_several_files_are_named_by_index_and_shapes_must_agree(tmp_path, fmt):
    fmt.write_extra_npz(tmp_path / "a.npz", 3)
    fmt.write_extra_npz(tmp_path / "b.npz", 3, hwc=(16, 16, 3))
    problems = check_extra_files([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")], None, None)
    assert len(problems) == 1 and "different shapes" in problems[0] and "dataset.extra[1]" in problems[0]
    problems = check_extra_files([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")], [3, 32, 32], 10)
    assert problems[0].startswith(f"dataset.extra[1]={tmp_path / 'b.npz'}: `image` holds 3x16x16")


def test_schema_keys(compose, tmp_path, fmt):
    from robust_train.config import check_run

    fmt.write_extra_npz(tmp_path / "a.npz", 4)
    one = compose(["logger=none", f"dataset.extra={tmp_path / 'a.npz'}"])
    assert check_run(one) == []
    both = compose(["logger=none", f"dataset.extra=[{tmp_path / 'a.npz'},{tmp_path / 'a.npz'}]"])
    assert check_run(both) == []
    problems = check_run(compose(["logger=none", "dataset.epoch_steps=10"]))
    assert problems == [
        "dataset.epoch_steps=10 needs dataset.extra: without extra data an epoch is one pass over the "
        "training set"
    ]
    assert "dataset.extra_fraction=1.5 is out of range" in " ".join(
        check_run(compose(["logger=none", "dataset.extra_fraction=1.5"]))
    )
    assert "dataset.extra=3 must be a path" in " ".join(
        check_run(compose(["logger=none", "dataset.extra=3"]))
    )


def test_training_refuses_unusable_files_before_anything_is_written(compose, tmp_path, fmt):
    fmt.write_extra_npz(tmp_path / "c.npz", 4, compressed=True)
    cfg = compose([*RUN, f"dataset.extra={tmp_path / 'c.npz'}"])
    with pytest.raises(ConfigError, match=r"^dataset\.extra=.*c\.npz: `image` is compressed") as info:
        train_run(cfg, tmp_path / "run")
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()
    check_training_data(compose(["logger=none"]).dataset)  # no extra: nothing to check


def test_cli_refuses_a_compressed_file_with_one_line_and_exit_2(tmp_path, fmt):
    fmt.write_extra_npz(tmp_path / "c.npz", 4, compressed=True)
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [str(bin_dir / "robust-train"), "debug=fast", "logger=none", f"dataset.extra={tmp_path / 'c.npz'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "np.savez (not np.savez_compressed)" in lines[0], done.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the plan


def test_plan_mixes_every_batch_and_streams_extra_images_without_repeats():
    n_train, bs, fraction, steps = 50, 16, 0.7, 9
    assert default_epoch_steps(n_train, bs) == 4
    stream = _IndexStream(100, seed=5)
    gen = torch.Generator().manual_seed(0)
    plans = [plan_epoch(n_train, bs, fraction, steps, gen, stream, e) for e in range(3)]
    n_orig = bs - int(bs * fraction)  # int(11.2) = 11 extra, 5 original
    for plan in plans:
        assert len(plan.orig) == len(plan.extra) == steps
        assert all(len(o) + len(e) == bs for o, e in zip(plan.orig, plan.extra))
        assert all(torch.equal(e, e.sort().values) for e in plan.extra)  # sorted for locality on disk
        # 50 originals in chunks of 5: ten chunks of one permutation cover 9 steps, no repeats.
        orig = torch.cat(plan.orig)
        assert len(orig) == steps * n_orig and len(set(orig.tolist())) == len(orig)
    # 3 epochs x 99 extra images: the first 100 are one permutation of range(100), then the next pass.
    extra = torch.cat([torch.cat(p.extra) for p in plans]).tolist()
    assert len(extra) == 3 * steps * (bs - n_orig)
    first_pass = [i for p in plans for e in p.extra for i in e.tolist()][:99]
    assert len(set(first_pass)) == 99
    # 297 positions of the stream: two whole passes over the 100 images and 97 of a third.
    counts = np.bincount(extra, minlength=100)
    assert counts.min() == 2 and counts.max() == 3 and counts.sum() == 297
    # An epoch's extra indices depend on the seed and the epoch only (resume needs no replay).
    again = plan_epoch(
        n_train, bs, fraction, steps, torch.Generator().manual_seed(9), _IndexStream(100, 5), 2
    )
    assert all(torch.equal(a, b) for a, b in zip(again.extra, plans[2].extra))
    other_seed = plan_epoch(n_train, bs, fraction, steps, gen, _IndexStream(100, 6), 0)
    assert not all(torch.equal(a, b) for a, b in zip(other_seed.extra, plans[0].extra))


def test_short_last_chunk_is_filled_with_extra_images():
    # 12 originals in chunks of 5: 5, 5, 2, then a new permutation.
    plan = plan_epoch(12, 16, 0.7, 4, torch.Generator().manual_seed(0), _IndexStream(1000, 0), 0)
    assert [len(o) for o in plan.orig] == [5, 5, 2, 5]
    assert [len(e) for e in plan.extra] == [11, 11, 14, 11]
    only_extra = plan_epoch(12, 16, 1.0, 2, torch.Generator().manual_seed(0), _IndexStream(1000, 0), 0)
    assert [len(o) for o in only_extra.orig] == [0, 0] and [len(e) for e in only_extra.extra] == [16, 16]


# ----------------------------------------------------------------------------- the reader


def test_feed_returns_the_planned_batches_in_order_and_stops(tmp_path, fmt):
    x, y = fmt.write_extra_npz(tmp_path / "a.npz", 40)
    data = ExtraData([tmp_path / "a.npz"])
    steps = [torch.tensor([1, 5, 7]), torch.tensor([0]), torch.tensor([2, 39]), torch.tensor([3, 4])]
    feed = ExtraFeed(data, steps, torch.device("cpu"), depth=1)
    for idx in steps[:3]:
        bx, by = feed.next()
        assert torch.equal(bx, chw(x[idx.numpy()])) and torch.equal(by, torch.from_numpy(y[idx.numpy()]))
    feed.close()  # one batch never taken: the reader stops anyway
    assert not feed._thread.is_alive()
    data.close()


def test_reader_error_reaches_the_training_thread(tmp_path, fmt, monkeypatch):
    fmt.write_extra_npz(tmp_path / "a.npz", 10)
    data = ExtraData([tmp_path / "a.npz"])

    def broken(*args, **kwargs):
        raise OSError("Input/output error")

    monkeypatch.setattr(data, "gather", broken)
    feed = ExtraFeed(data, [torch.tensor([1])], torch.device("cpu"))
    with pytest.raises(DataError, match=r"dataset\.extra: reading .*a\.npz failed: OSError: Input/output"):
        feed.next()
    assert not feed._thread.is_alive()


def test_dropped_feed_stops_its_reader(tmp_path, fmt):
    fmt.write_extra_npz(tmp_path / "a.npz", 10)
    data = ExtraData([tmp_path / "a.npz"])
    feed = ExtraFeed(data, [torch.tensor([i]) for i in range(10)], torch.device("cpu"), depth=1)
    thread = feed._thread
    del feed  # e.g. an exception left train_epoch without close()
    thread.join(timeout=5)
    assert not thread.is_alive()


# ----------------------------------------------------------------------------- in training


def test_training_batches_mix_original_and_extra_images(compose, tmp_path, fmt, monkeypatch):
    images, labels = fmt.write_extra_npz(tmp_path / "a.npz", 300, seed=4)
    extra_table = fmt.image_table(chw(images), labels)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = TrainStep.__call__

    def spy(self, x, y):
        seen.append((x.detach().clone(), y.clone()))
        return original(self, x, y)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    cfg = compose([
        *RUN, f"dataset.extra={tmp_path / 'a.npz'}", "dataset.crop_pad=0", "dataset.flip=false",
        "trainer.epochs=2",
    ])  # fmt: skip
    res = train_run(cfg, tmp_path / "run")
    # 64 training images / batch 16 -> 4 steps per epoch (DM-AT's ceil(n / batch)), 2 epochs.
    assert len(seen) == 8 and res["train"]["epochs_completed"] == 2
    used: list[bytes] = []
    for x, y in seen:
        assert x.shape == (16, 3, 32, 32)
        u8 = (x * 255).round().to(torch.uint8)  # no crop or flip: the stored pixels
        for k in range(16):
            key = u8[k].numpy().tobytes()
            if k < 5:  # 16 - int(16 * 0.7) = 5 original images first
                assert key not in extra_table
            else:
                assert extra_table[key] == int(y[k])  # pseudo-labels used as given
                used.append(key)
    assert len(used) == 8 * 11 and len(set(used)) == len(used)  # no extra image twice before 300 are used

    steps_cfg = compose([*RUN, f"dataset.extra={tmp_path / 'a.npz'}", "dataset.epoch_steps=3"])
    seen.clear()
    train_run(steps_cfg, tmp_path / "run3")
    assert len(seen) == 3


def test_extra_labels_outside_the_classes_are_refused(compose, tmp_path, fmt):
    np.savez(tmp_path / "a.npz", image=np.zeros((3, 32, 32, 3), np.uint8), label=np.array([0, 11, 4]))
    cfg = compose([*RUN, f"dataset.extra={tmp_path / 'a.npz'}"])
    with pytest.raises(ConfigError, match=r"`label` ranges from 0 to 11; allowed: 0\.\.9"):
        train_run(cfg, tmp_path / "run")


def test_convert_command_line(tmp_path, fmt):
    fmt.write_extra_npz(tmp_path / "c.npz", 5, compressed=True)
    done = subprocess.run(
        [sys.executable, "-m", "robust_train.data.extra", "convert", str(tmp_path / "c.npz"),
         str(tmp_path / "u.npz")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert check_extra_files([str(tmp_path / "u.npz")], [3, 32, 32], 10) == []
