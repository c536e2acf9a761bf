"""The command line end to end on mnist5k (debug=fast), resume, robust-eval and user-error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from robust_train.commands.train import train_run
from robust_train.tracking.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run_cli(prog: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [str(BIN / prog), *args], capture_output=True, text=True, cwd=cwd or REPO, env=env, timeout=300
    )


FAST = ["debug=fast", "logger=none", "trainer.progress=false"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    proc = run_cli("robust-train", *FAST, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run_dir


def test_train_writes_checkpoints_and_results(trained_run: Path) -> None:
    assert (trained_run / "last.pt").is_file() and (trained_run / "best.pt").is_file()
    res = json.loads((trained_run / "results.json").read_text())
    assert res["seed"] == 0 and res["config"]["defense"]["name"] == "pgd_at"
    assert res["versions"]["torch"] and res["train"]["epochs_completed"] == 1
    for kind in ("best", "last"):
        attacks = res["eval"][kind]["attacks"]
        assert set(attacks) == {"clean", "pgd20", "cw20", "autoattack_lite"}
        for a in attacks.values():
            assert 0.0 <= a["accuracy"] <= 100.0 and a["n"] == 64 and a["time_s"] >= 0
        assert attacks["pgd20"]["accuracy"] <= attacks["clean"]["accuracy"]
        assert attacks["pgd20"]["attack"]["steps"] == 20


def test_rerun_of_a_finished_run_prints_its_results_and_force_evaluates_again(trained_run: Path) -> None:
    before = load_checkpoint(trained_run / "last.pt")["model"]
    results = (trained_run / "results.json").read_text()
    proc = run_cli("robust-train", *FAST, f"hydra.run.dir={trained_run}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "finished: 1 epochs trained and evaluated" in proc.stdout and "resumed from" not in proc.stdout
    assert "| checkpoint |" in proc.stdout and "eval.force=true" in proc.stdout
    assert (trained_run / "results.json").read_text() == results  # nothing evaluated, nothing written

    proc = run_cli("robust-train", *FAST, f"hydra.run.dir={trained_run}", "eval.force=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and "finished:" not in proc.stdout
    after = load_checkpoint(trained_run / "last.pt")["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # evaluated again, not retrained
    assert json.loads((trained_run / "results.json").read_text())["config"]["eval"]["force"] is True


def test_robust_eval_on_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = run_cli(
        "robust-eval", f"checkpoint={trained_run / 'best.pt'}", "eval=quick", "eval.n_examples=32",
        "logger=none", f"hydra.run.dir={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert res["eval"]["best"]["attacks"]["clean"]["n"] == 32
    assert "pgd20" in proc.stdout


def test_python_dash_m_works(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "robust_train", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0 and "defense" in proc.stdout


def test_wandb_offline_run_is_created(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        "robust-train", "debug=fast", "trainer.progress=false", "logger=wandb", f"hydra.run.dir={run_dir}",
        "eval.checkpoints=[last]",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = load_checkpoint(run_dir / "last.pt")["wandb_run_id"]
    assert run_id and runs[0].name.endswith(run_id)


# ----------------------------------------------------------------------------- user errors


def _assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text
    assert "Traceback" not in text, text
    for frag in fragments:
        assert frag in text, f"{frag!r} not in: {text}"


def test_unknown_group_option_names_group_and_choices() -> None:
    proc = run_cli("robust-train", *FAST, "model=resnet1000")
    _assert_user_error(proc, "model", "preact_resnet18", "wrn34_10")


@pytest.mark.parametrize("eps", ["-0.1", "2", "abc"])
def test_bad_eps_is_refused(eps: str, tmp_path: Path) -> None:
    proc = run_cli("robust-train", *FAST, f"threat.eps={eps}", f"hydra.run.dir={tmp_path}")
    _assert_user_error(proc, "threat.eps")
    assert proc.returncode == 2
    assert not (tmp_path / "last.pt").exists()


def test_missing_dataset_files_name_the_path(tmp_path: Path) -> None:
    root = tmp_path / "nodata"
    proc = run_cli(
        "robust-train", *FAST, "dataset=cifar10", f"dataset.root={root}", "dataset.download=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    )  # fmt: skip
    _assert_user_error(proc, str(root), "cifar-10-batches-py")
    assert proc.returncode == 2


def test_resuming_with_another_architecture_is_refused(trained_run: Path, tmp_path: Path) -> None:
    proc = run_cli("robust-train", *FAST, "model=resnet18", f"hydra.run.dir={trained_run}")
    _assert_user_error(proc, "model.name", "preact_resnet18", "resnet18")
    assert proc.returncode == 2


def test_eval_of_checkpoint_with_another_architecture_is_refused(trained_run: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "robust-eval", f"checkpoint={trained_run / 'last.pt'}", "model.name=resnet18", "logger=none",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    _assert_user_error(proc, "resnet18")
    assert proc.returncode == 2


def test_eval_of_truncated_checkpoint_is_refused(trained_run: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes((trained_run / "last.pt").read_bytes()[:1000])
    proc = run_cli("robust-eval", f"checkpoint={bad}", "logger=none", f"hydra.run.dir={tmp_path / 'e'}")
    _assert_user_error(proc, str(bad), "unreadable")
    assert proc.returncode == 2


def test_unknown_key_is_refused() -> None:
    proc = run_cli("robust-train", *FAST, "trainer.epochz=3")
    _assert_user_error(proc, "epochz")


# ----------------------------------------------------------------------------- in-process runs


def _cfg(compose, tmp: Path, *extra: str):
    return compose(
        [*FAST, "dataset.train_limit=96", "trainer.batch_size=32", "eval.checkpoints=[last]", *extra]
    )


def test_resume_is_exact(compose, tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch, stop, resume, 1 more epoch: identical weights on the CPU."""
    straight = tmp_path / "straight"
    train_run(_cfg(compose, tmp_path, "trainer.epochs=2"), straight)
    split = tmp_path / "split"
    train_run(_cfg(compose, tmp_path, "trainer.epochs=1"), split)
    train_run(_cfg(compose, tmp_path, "trainer.epochs=2"), split)
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(split / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["train/loss"] for h in a["history"]] == [h["train/loss"] for h in b["history"]]
    assert a["history"][1]["val/robust_acc"] == b["history"][1]["val/robust_acc"]


def test_same_seed_same_run_and_other_seed_differs(compose, tmp_path: Path) -> None:
    train_run(_cfg(compose, tmp_path), tmp_path / "a")
    train_run(_cfg(compose, tmp_path), tmp_path / "b")
    train_run(_cfg(compose, tmp_path, "seed=1"), tmp_path / "c")
    ma, mb, mc = (load_checkpoint(tmp_path / d / "last.pt")["model"] for d in "abc")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert not all(torch.equal(ma[k], mc[k]) for k in ma)


def test_standard_defense_runs(compose, tmp_path: Path) -> None:
    res = train_run(_cfg(compose, tmp_path, "defense=standard"), tmp_path / "std")
    assert res["config"]["defense"]["attack"] is None
    assert set(res["eval"]["last"]["attacks"]) == {"clean", "pgd20", "cw20", "autoattack_lite"}


def test_multirun_jobs_get_own_dirs_and_share_the_sweep_group(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep-xyz"
    proc = run_cli(
        "robust-train", "-m", "debug=fast", "trainer.progress=false", "logger=wandb",
        "eval.checkpoints=[last]", "defense=pgd_at,standard", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(2)]
    assert [r["config"]["defense"]["name"] for r in results] == ["pgd_at", "standard"]
    assert all(r["wandb"]["group"] == "sweep-xyz" for r in results)
    assert results[0]["wandb"]["run_id"] != results[1]["wandb"]["run_id"]


@pytest.mark.parametrize("defense", ["trades", "mart", "awp", "trades_awp", "mart_awp"])
def test_every_defense_trains_and_evaluates_the_default_suite(compose, tmp_path: Path, defense: str) -> None:
    cfg = compose(
        [*FAST, f"defense={defense}", "dataset.train_limit=64", "trainer.batch_size=32", "eval=default",
         "eval.n_examples=16", "eval.checkpoints=[last]", "defense.awp.warmup_epochs=0"]
    )  # fmt: skip
    res = train_run(cfg, tmp_path / defense)
    attacks = res["eval"]["last"]["attacks"]
    assert set(attacks) == {"clean", "pgd20", "cw20", "autoattack_lite"}
    for a in attacks.values():
        assert a["n"] == 16 and 0 <= a["accuracy"] <= attacks["clean"]["accuracy"] + 1e-9
    assert attacks["autoattack_lite"]["details"]["attacks"] == ["apgd-ce", "apgd-t"]
    assert res["config"]["defense"]["awp"]["enabled"] == ("awp" in defense)
