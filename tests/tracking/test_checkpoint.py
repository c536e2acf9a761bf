"""Atomic checkpoints, clear errors on bad files, RNG round trips, results files."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from robust_train.errors import CheckpointError
from robust_train.tracking.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from robust_train.tracking.results import format_table, new_results, write_results


def test_save_and_load_round_trip(tmp_path, tiny_model) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 3, "model": tiny_model.state_dict()}, path)
    state = load_checkpoint(path)
    assert state["epoch"] == 3
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    # no temporary file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_truncated_missing_and_foreign_files_are_refused(tmp_path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.randn(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a robust-train checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_rng_state_round_trip_survives_save_load(tmp_path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    save_checkpoint({"rng": rng_state()}, tmp_path / "c.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == got[0] and expected[1] == got[1] and torch.equal(expected[2], got[2])


def test_results_file_and_table(tmp_path) -> None:
    results = new_results({"seed": 0}, 0, "cpu", tmp_path)
    results["eval"] = {
        "suite": "quick",
        "n_examples": 10,
        "best": {
            "epoch": 2,
            "attacks": {"clean": {"accuracy": 90.0, "n": 10}, "pgd20": {"accuracy": 40.0, "n": 10}},
        },
        "last": {
            "epoch": 3,
            "attacks": {"clean": {"accuracy": 80.0, "n": 10}, "pgd20": {"accuracy": 30.0, "n": 10}},
        },
    }
    write_results(results, tmp_path / "results.json")
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["versions"]["torch"] == torch.__version__ and loaded["versions"]["python"]
    assert loaded["config"] == {"seed": 0} and loaded["format"] == "robust-train-results"
    assert loaded["eval"]["best"]["attacks"]["pgd20"]["accuracy"] == 40.0
    table = format_table(loaded["eval"])
    assert "pgd20" in table and "90.00" in table and "30.00" in table and "10 test images" in table
