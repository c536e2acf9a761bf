"""Checkpoints survive hard kills at any point of a save: checksum verified, previous file as fallback."""

from __future__ import annotations

import os

import pytest
import torch

from robust_train.errors import CheckpointError
from robust_train.tracking import checkpoint as ckpt
from robust_train.tracking.checkpoint import (
    checksum_path,
    load_checkpoint,
    previous_path,
    resumable_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


def _two_saves(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.full((256,), 1.0)}, path)
    save_checkpoint({"epoch": 2, "w": torch.full((256,), 2.0)}, path)
    return path


def test_save_keeps_previous_with_its_checksum(tmp_path) -> None:
    path = _two_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "last.prev.pt", "last.prev.pt.sha256", "last.pt", "last.pt.sha256",
    ]  # fmt: skip
    assert verify_checkpoint(path) is True and verify_checkpoint(previous_path(path)) is True
    assert load_checkpoint(path)["epoch"] == 2 and load_checkpoint(previous_path(path))["epoch"] == 1
    assert checksum_path(path).read_text().split()[1] == "last.pt"


def test_flipped_bit_is_detected_and_previous_is_used(tmp_path) -> None:
    path = _two_saves(tmp_path)
    data = bytearray(path.read_bytes())
    # Flip one byte inside the tensor data (torch stores 2.0 as 0x40000000): still a readable file.
    i = data.index(bytes.fromhex("00000040"))
    data[i + 3] ^= 0x01
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["w"][0] != 2.0  # torch alone would not notice
    with pytest.raises(CheckpointError, match="SHA-256 does not match"):
        load_checkpoint(path)
    with pytest.warns(RuntimeWarning, match=r"using the previous checkpoint .*last.prev.pt \(epoch 1\)"):
        assert load_checkpoint(path, fallback=True)["epoch"] == 1


def test_truncated_newest_falls_back(tmp_path) -> None:
    path = _two_saves(tmp_path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert load_checkpoint(path, fallback=True)["epoch"] == 1


def test_both_bad_is_one_clear_error(tmp_path) -> None:
    path = _two_saves(tmp_path)
    for p in (path, previous_path(path)):
        p.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="the fallback is unusable too"):
        load_checkpoint(path, fallback=True)


def test_missing_checksum_file_loads_unverified(tmp_path) -> None:
    path = _two_saves(tmp_path)
    checksum_path(path).unlink()
    assert verify_checkpoint(path) is None and load_checkpoint(path)["epoch"] == 2


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (no except/finally cleanup in user code matters)."""


@pytest.mark.parametrize("kill_at", range(6))
def test_kill_at_any_point_of_a_save_loses_nothing(tmp_path, monkeypatch, kill_at: int) -> None:
    """Interrupt the save at each of its renames/unlinks: the loader always finds epoch 2 or 3."""
    path = _two_saves(tmp_path)
    calls = [0]
    real_replace = os.replace

    def replace(a, b):
        if calls[0] == kill_at:
            raise _Killed
        calls[0] += 1
        return real_replace(a, b)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt.os, "unlink", lambda p: None)  # a killed process cleans nothing up
    try:
        save_checkpoint({"epoch": 3, "w": torch.full((256,), 3.0)}, path)
    except _Killed:
        pass
    monkeypatch.undo()
    assert resumable_checkpoint(path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = load_checkpoint(path, fallback=True)
    assert state["epoch"] in (2, 3) and float(state["w"][0]) == state["epoch"]
    # The next save cleans up whatever temporaries the killed one left.
    save_checkpoint({"epoch": 4}, path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
