"""A W&B project that compares runs without cleanup, checked on the offline files W&B would sync.

The runs are read back by `wandb_offline.py` (beside this file): numeric hyperparameters, names unique
in a sweep, run metadata, the selected epoch in the summary, eval runs in their training run's group,
the error text of failed runs, one step axis across a resume, nothing written outside the run dir.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import wandb_offline  # noqa: E402
from wandb_offline import OfflineRun  # noqa: E402

from robust_train.cli import eval_main, train_main  # noqa: E402

SWEEP = [
    "-m", "debug=fast", "defense=trades", "defense.beta=1,6", "trainer.optimizer.lr=0.1,0.05",
    "threat.eps=8/255", "eval=quick", "eval.n_examples=16", "logger.example_images=2",
    "trainer.validation.pgd_steps=1", "eval.sanity.enabled=false",
]  # fmt: skip
TRAIN = [
    "debug=fast", "logger=wandb", "trainer.progress=false", "eval=quick", "eval.n_examples=16",
    "eval.checkpoints=[last]", "trainer.validation.pgd_steps=1", "eval.sanity.enabled=false",
    "logger.example_images=0",
]  # fmt: skip


def find_runs(root: Path) -> list[OfflineRun]:
    """The offline runs below `root`, once W&B has written them out: its service process writes the
    run file after `finish()` returns, so an in-process read must wait for the service to stop."""
    import wandb

    wandb.teardown()
    return wandb_offline.find_runs(root)


def _home_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


@pytest.fixture
def empty_home(tmp_path: Path, monkeypatch) -> Path:
    """A HOME (and XDG dirs) that must stay empty: W&B's staging and cache belong in the run dir."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "WANDB_DATA_DIR", "WANDB_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    return home


def test_two_by_two_sweep_and_its_eval_run_read_back_from_the_offline_files(
    cli, tmp_path: Path, empty_home: Path
) -> None:
    sweep = tmp_path / "sweep"
    code, text = cli(train_main, "robust-train", [*SWEEP, f"hydra.sweep.dir={sweep}"])
    assert code == 0, text[-3000:]
    runs = find_runs(sweep)
    assert len(runs) == 4
    names = [r.name for r in runs]
    assert len(set(names)) == 4, names
    for beta in ("1", "6"):
        for lr in ("0.1", "0.05"):
            assert f"mnist5k-preact_resnet18-trades-s0 defense.beta={beta} trainer.optimizer.lr={lr}" in names
    for run in runs:
        # numbers, not "8/255" and "eps/4": one filterable, plottable column across datasets
        assert run.config_value("threat.eps") == pytest.approx(8 / 255)
        assert run.config_value("threat.step") == pytest.approx(2 / 255)
        assert run.config_value("defense.attack.step") == pytest.approx(2 / 255)
        assert run.config_value("eval.attacks.pgd20.step") == pytest.approx(2 / 255)
        assert run.group == "sweep" and run.job_type == "train" and "defense:trades" in run.tags
        assert run.config_value("run.params") > 1000
        assert run.config_value("run.device") == "cpu"
        assert run.config_value("run.dir") == str(run.path.parents[1].resolve())
        assert "threat.eps=8/255" in run.config_value("run.overrides")
        assert len(run.config_value("run.swept")) == 2
        assert run.summary["best_epoch"] == 1 and run.exit_code == 0
        assert run.summary["best/val/robust_acc"] == run.history[0]["val/robust_acc"]
        assert not isinstance(run.summary.get("val/robust_acc"), dict)  # not {"max": ...}
    assert _home_files(empty_home) == []

    # robust-eval on a run directory: best.pt, results beside it, the W&B run in the training run's group
    trained = runs[0]
    run_dir = trained.path.parents[1]
    argv = [f"checkpoint={run_dir}", "eval=quick", "eval.n_examples=8", "logger.example_images=0",
            "eval.sanity.enabled=false"]  # fmt: skip
    code, text = cli(eval_main, "robust-eval", argv)
    assert code == 0, text[-3000:]
    outs = sorted((run_dir / "eval").glob("quick-best-*/results.json"))
    assert len(outs) == 1, list((run_dir / "eval").iterdir()) if (run_dir / "eval").exists() else run_dir
    results = json.loads(outs[0].read_text())
    assert results["train_run"]["run_id"] == trained.run_id
    [evaluation] = find_runs(run_dir / "eval")
    assert evaluation.job_type == "eval" and evaluation.group == trained.group == "sweep"
    assert evaluation.config_value("checkpoint") == str((run_dir / "best.pt").resolve())
    assert evaluation.config_value("checkpoint_kind") == "best"
    assert evaluation.config_value("train_run.run_id") == trained.run_id
    assert evaluation.config_value("train_run.name") == trained.name
    assert trained.name in evaluation.name and "defense:trades" in evaluation.tags
    assert _home_files(empty_home) == []

    # The console record: epoch lines and the results table, not only logging records.
    log = (run_dir / "cli.log").read_text()
    assert "epoch 1/1" in log and "| checkpoint |" in log and "results: " in log


def _train(compose, run_dir: Path, *extra: str) -> dict:
    from robust_train.commands.train import train_run

    base = [o for o in TRAIN if not o.startswith("logger.")] if "logger=none" in extra else TRAIN
    return train_run(compose([*base, *extra]), run_dir)


def _by_time(run_dir: Path) -> list[OfflineRun]:
    return sorted(find_runs(run_dir), key=lambda r: r.path.name)


def test_resumed_run_continues_its_step_axis_in_the_same_wandb_run(
    compose, tmp_path: Path, empty_home: Path
) -> None:
    run_dir = tmp_path / "run"
    _train(compose, run_dir, "trainer.epochs=1")
    _train(compose, run_dir, "trainer.epochs=2")  # resumes after epoch 1 and trains epoch 2
    first, second = _by_time(run_dir)
    assert first.run_id == second.run_id
    assert first.group == first.name == "mnist5k-preact_resnet18-pgd_at-s0"  # a single run is its group
    steps_1 = [h["_step"] for h in first.history]
    steps_2 = [h["_step"] for h in second.history]
    assert steps_1 == sorted(steps_1) and steps_2 == sorted(steps_2)
    assert min(steps_2) == max(steps_1) + 1  # one increasing axis once both are synced
    epochs = [h["epoch"] for h in first.history + second.history if "val/robust_acc" in h]
    assert epochs == [1, 2]
    assert second.summary["epochs_completed"] == 2
    assert _home_files(empty_home) == []


def test_finished_run_rerun_opens_no_wandb_run(compose, tmp_path: Path, empty_home: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    _train(compose, run_dir)
    before = (run_dir / "results.json").read_text()
    again = _train(compose, run_dir)
    assert "finished: 1 epochs trained and evaluated" in capsys.readouterr().out
    assert len(find_runs(run_dir)) == 1 and (run_dir / "results.json").read_text() == before
    assert again["eval"]["last"]["attacks"] == json.loads(before)["eval"]["last"]["attacks"]
    # Another suite is work left to do: evaluated (the W&B run resumed), not printed.
    _train(compose, run_dir, "eval.n_examples=8")
    assert len(find_runs(run_dir)) == 2
    assert json.loads((run_dir / "results.json").read_text())["eval"]["last"]["attacks"]["clean"]["n"] == 8
    # trainer.resume=false asks for a fresh run in this directory: trained again, as a new W&B run.
    _train(compose, run_dir, "eval.n_examples=8", "trainer.resume=false")
    runs = find_runs(run_dir)
    assert len(runs) == 3 and len({r.run_id for r in runs}) == 2


def test_failed_run_carries_its_error_in_summary_and_notes(
    compose, tmp_path: Path, monkeypatch, empty_home: Path
) -> None:
    from robust_train.commands import train

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train, "evaluate_checkpoints", broken)
    with pytest.raises(RuntimeError):
        _train(compose, tmp_path / "run")
    [run] = find_runs(tmp_path / "run")
    assert run.summary["error"] == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert run.notes.startswith(run.summary["error"]) and "Traceback" in run.notes
    assert run.exit_code == 1 and not run.preempting

    # The rerun resumes the same W&B run and clears the error of the failed attempt.
    monkeypatch.undo()
    _train(compose, tmp_path / "run")
    failed, resumed = _by_time(tmp_path / "run")
    assert resumed.run_id == failed.run_id and resumed.exit_code == 0
    assert resumed.summary["error"] is None


def test_ctrl_c_outside_the_training_loop_is_one_line_and_the_rerun_finishes(
    cli, tmp_path: Path, monkeypatch, empty_home: Path
) -> None:
    from robust_train.commands import train

    run_dir = tmp_path / "run"
    evaluate = train.evaluate_checkpoints

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "evaluate_checkpoints", interrupted)
    code, text = cli(train_main, "robust-train", [*TRAIN, f"hydra.run.dir={run_dir}"])
    assert code == 130 and "robust-train: interrupted" in text and "Traceback" not in text
    [run] = find_runs(run_dir)
    assert run.exit_code == 130 and run.preempting and "error" not in run.summary  # stopped, not failed
    assert "robust-train: interrupted" in (run_dir / "cli.log").read_text()

    monkeypatch.setattr(train, "evaluate_checkpoints", evaluate)
    code, text = cli(train_main, "robust-train", [*TRAIN, f"hydra.run.dir={run_dir}"])
    assert code == 0, text[-2000:]
    assert "resumed from" in text and "| checkpoint |" in text
    first, second = _by_time(run_dir)
    assert second.run_id == first.run_id and second.exit_code == 0


@pytest.mark.parametrize(
    "change,key",
    [("defense=trades", "defense.name"), ("threat.eps=0.05", "threat.eps"),
     ("trainer.optimizer.lr=0.01", "trainer.optimizer.lr"), ("addons=[lad]", "addons")],
)  # fmt: skip
def test_a_run_dir_is_not_resumed_under_another_training_config(compose, tmp_path: Path, change, key) -> None:
    from robust_train.errors import CheckpointError

    run_dir = tmp_path / "run"
    _train(compose, run_dir)
    before = (run_dir / "results.json").read_text()
    # A longer run of the same config is work left to do, not another config.
    with pytest.raises(CheckpointError, match=rf"written by a run with {key}=.*but this run has {key}="):
        _train(compose, run_dir, "trainer.epochs=2", change)
    assert (run_dir / "results.json").read_text() == before  # nothing relabelled


def test_eval_of_a_run_trained_without_wandb_joins_its_group(
    cli, compose, tmp_path: Path, empty_home
) -> None:
    run_dir = tmp_path / "run"
    _train(compose, run_dir, "logger=none")
    argv = [f"checkpoint={run_dir / 'last.pt'}", "eval=quick", "eval.n_examples=8", "logger.example_images=0",
            "eval.sanity.enabled=false"]  # fmt: skip
    code, text = cli(eval_main, "robust-eval", argv)
    assert code == 0, text[-2000:]
    [evaluation] = find_runs(run_dir / "eval")
    assert evaluation.group == "mnist5k-preact_resnet18-pgd_at-s0" and evaluation.path.parents[
        1
    ].name.startswith("quick-last-")
    assert evaluation.config_value("train_run.run_id") is None


def test_ctrl_c_before_anything_is_written_leaves_no_run_dir(cli, tmp_path: Path, monkeypatch) -> None:
    from robust_train.commands import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_run", interrupted)
    run_dir = tmp_path / "outputs" / "run"
    code, text = cli(train_main, "robust-train", [*TRAIN, f"hydra.run.dir={run_dir}"])
    assert code == 130 and "robust-train: interrupted" in text
    assert not run_dir.exists() and not run_dir.parent.exists()


def test_a_run_stopped_before_its_first_checkpoint_continues_its_wandb_run(
    compose, tmp_path: Path, monkeypatch, empty_home: Path
) -> None:
    from robust_train.training.trainer import Trainer

    def stopped(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "fit", stopped)
        with pytest.raises(KeyboardInterrupt):
            _train(compose, tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()
    _train(compose, tmp_path / "run")
    first, second = _by_time(tmp_path / "run")
    assert first.preempting and second.run_id == first.run_id and second.exit_code == 0
    # A fresh start on purpose is a new W&B run.
    _train(compose, tmp_path / "run", "trainer.resume=false")
    assert len({r.run_id for r in find_runs(tmp_path / "run")}) == 2
