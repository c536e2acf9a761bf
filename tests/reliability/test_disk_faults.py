"""Disk full while writing: the previous checkpoint/results survive and the error names path and space."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from robust_train.commands.train import train_run
from robust_train.errors import RobustTrainError, StorageError
from robust_train.tracking.checkpoint import load_checkpoint, save_checkpoint
from robust_train.tracking.results import write_results

FAST = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval.checkpoints=[last]", "eval=quick",
    "eval.n_examples=8", "dataset.train_limit=48", "trainer.batch_size=16", "trainer.max_batches=null",
    "trainer.validation.max_examples=16", "trainer.validation.pgd_steps=1", "defense=standard",
    "eval.sanity.enabled=false",
]  # fmt: skip


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_after_partial_write(obj, f):
    with open(f, "wb") as fh:
        fh.write(b"PK\x03\x04partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_checkpoint_write_on_full_disk(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    monkeypatch.setattr(torch, "save", _full_after_partial_write)
    with pytest.raises(StorageError) as err:
        save_checkpoint({"epoch": 2}, path)
    msg = str(err.value)
    assert str(path) in msg and "No space left on device" in msg and "free space there:" in msg
    assert isinstance(err.value, OSError) and isinstance(err.value, RobustTrainError)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_checksum_write_on_full_disk_keeps_previous(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "best.pt"
    save_checkpoint({"epoch": 1}, path)
    monkeypatch.setattr(Path, "write_text", _enospc)
    with pytest.raises(StorageError, match="best.pt.sha256"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.sha256"]


def test_results_write_on_full_disk(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "results.json"
    write_results({"a": 1}, path)
    monkeypatch.setattr(json, "dump", _enospc)
    with pytest.raises(StorageError, match="results.json: No space left on device"):
        write_results({"a": 2}, path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"a": 1}


def test_training_stops_clearly_and_keeps_the_last_good_checkpoint(compose, tmp_path, monkeypatch) -> None:
    saves = [0]
    real_save = torch.save

    def fill_up_on_second_epoch(obj, f, *a, **k):
        saves[0] += 1
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            return _full_after_partial_write(obj, f)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fill_up_on_second_epoch)
    with pytest.raises(
        StorageError, match=r"last.pt: No space left on device .*previous last.pt is unchanged"
    ):
        train_run(compose([*FAST, "trainer.epochs=2"]), tmp_path / "run")
    monkeypatch.undo()
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1
    # Space freed: the same command resumes from epoch 1 and finishes.
    res = train_run(compose([*FAST, "trainer.epochs=2"]), tmp_path / "run")
    assert res["train"]["epochs_completed"] == 2


def test_full_disk_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from robust_train.cli import train_main

    monkeypatch.setattr(torch, "save", _full_after_partial_write)
    monkeypatch.setattr(sys, "argv", ["robust-train", *FAST, "trainer.epochs=1", f"hydra.run.dir={tmp_path}"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exc:
        train_main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert err.startswith("robust-train: error: could not write") and "No space left on device" in err
