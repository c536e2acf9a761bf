"""robust-eval reads a run directory and writes beside the checkpoint; its help shows what it uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robust_train.cli import eval_main
from robust_train.errors import CheckpointError
from robust_train.eval_dirs import checkpoint_file, eval_dir

STAMP = "2026-12-06_10-30-00"


def test_a_run_directory_means_its_best_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "best.pt").write_bytes(b"x")
    (tmp_path / "last.pt").write_bytes(b"x")
    assert checkpoint_file(tmp_path) == tmp_path / "best.pt"
    assert checkpoint_file(tmp_path / "last.pt") == tmp_path / "last.pt"
    (tmp_path / "best.pt").unlink()
    with pytest.raises(CheckpointError, match=r"without best.pt; it holds last.pt: name one"):
        checkpoint_file(tmp_path)


def test_output_dir_is_beside_the_checkpoint_named_by_the_suite_that_runs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"config": {"eval": {"name": "paper_slim"}}}))
    ckpt = run / "last.pt"
    # eval= chosen: that suite; not chosen: the suite stored with the run (which is what runs).
    assert eval_dir(str(ckpt), "quick", ["eval=quick"], STAMP) == str(run / "eval" / f"quick-last-{STAMP}")
    assert eval_dir(str(ckpt), "default", ["eval.n_examples=8"], STAMP) == str(
        run / "eval" / f"paper_slim-last-{STAMP}"
    )
    assert eval_dir(str(run), "default", [], STAMP) == str(run / "eval" / f"paper_slim-best-{STAMP}")
    (run / "results.json").unlink()
    assert eval_dir(str(ckpt), "default", [], STAMP) == str(run / "eval" / f"default-last-{STAMP}")
    # Weights from elsewhere keep the date/time layout.
    assert eval_dir(None, "default", [], STAMP) == "outputs/eval/2026-12-06/10-30-00"


def test_help_lists_the_sources_and_not_the_keys_robust_eval_ignores(cli) -> None:
    code, text = cli(eval_main, "robust-eval", ["--help"])
    assert code == 0
    assert "checkpoint=<run dir or .pt file>" in text and "state_dict=<file>" in text
    assert "model_zoo.name=" in text and "<run dir>/eval/<suite>-<checkpoint>-<time>/" in text
    config = text.split("== Config ==", 1)[1]
    keys = {line.strip().split(":")[0] for line in config.splitlines() if line.startswith("  ")}
    assert "force" not in keys and "checkpoints" not in keys
    assert {"n_examples", "batch_size", "sanity", "attacks"} <= keys  # what it does use stays
    groups = text.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    assert "eval:" in groups and "defense:" not in groups and "trainer:" not in groups
