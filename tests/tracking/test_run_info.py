"""Run names in sweeps, run metadata, the console record, numeric configs and checkpoint artifacts."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
import wandb
from omegaconf import OmegaConf

from robust_train.cli import _swept_keys
from robust_train.config import numeric_config
from robust_train.console_log import console_record
from robust_train.tracking.run_info import JobInfo, run_metadata, swept_overrides, unique_name
from robust_train.tracking.wandb_run import WandbTracker

BASE = "mnist5k-preact_resnet18-trades-s0"


def test_names_carry_the_swept_values_and_stay_unique_in_a_sweep() -> None:
    names = set()
    for beta in ("1", "6"):
        for lr in ("0.1", "0.05"):
            job = JobInfo(
                overrides=["defense=trades", f"defense.beta={beta}", "threat.eps=8/255", f"+trainer.x={lr}"],
                swept=["defense.beta", "trainer.x"],
                num=0,
                multirun=True,
            )
            assert swept_overrides(job) == [f"defense.beta={beta}", f"trainer.x={lr}"]
            names.add(unique_name(BASE, job))
    assert len(names) == 4
    assert f"{BASE} defense.beta=6 trainer.x=0.05" in names  # fixed overrides stay out of the name


def test_single_runs_seed_sweeps_and_unreadable_sweeps() -> None:
    assert unique_name(BASE, None) == BASE
    assert unique_name(BASE, JobInfo(overrides=["defense.beta=6"], swept=[], multirun=False)) == BASE
    # The default name shows the seed already; a chosen name does not.
    seeds = JobInfo(["name=mine", "seed=1"], ["seed"], num=1, multirun=True)
    assert unique_name(BASE, seeds, in_base=("seed",)) == BASE
    assert unique_name("mine", seeds) == "mine seed=1"
    both = JobInfo(["seed=1", "trainer.nan.max_term=0.001"], ["seed", "trainer.nan.max_term"], 3, True)
    assert unique_name("mine", both) == "mine seed=1 trainer.nan.max_term=0.001"
    assert run_metadata(seeds, Path("."), torch.device("cpu"), None)["swept"] == ["seed=1"]
    # A sweep whose keys could not be read: the job number keeps the names apart.
    assert unique_name(BASE, JobInfo(["defense.beta=6"], [], num=3, multirun=True)) == f"{BASE} job3"


def test_swept_keys_come_from_the_sweep_overrides_and_the_sweeper_params(tmp_path: Path) -> None:
    OmegaConf.save(
        {"hydra": {"overrides": {"task": ["defense=trades", "defense.beta=1,6", "seed=range(0,3)",
                                          "threat.eps=8/255"]},
                   "sweeper": {"params": {"trainer.optimizer.lr": "interval(0.01, 0.2)"}}}},
        tmp_path / "multirun.yaml",
    )  # fmt: skip
    assert _swept_keys(tmp_path) == ["defense.beta", "seed", "trainer.optimizer.lr"]
    assert _swept_keys(tmp_path / "missing") == []


def test_run_metadata_names_the_run_and_its_code(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    job = JobInfo(["defense.beta=6", "seed=1"], ["defense.beta"], num=2, multirun=True)
    meta = run_metadata(job, tmp_path, torch.device("cpu"), model)
    assert meta["params"] == 8 and meta["device"] == "cpu" and meta["job"] == 2
    assert meta["overrides"] == ["defense.beta=6", "seed=1"] and meta["swept"] == ["defense.beta=6"]
    assert meta["dir"] == str(tmp_path.resolve())
    assert meta["git_sha"] is None or len(meta["git_sha"]) == 40


def test_numeric_config_converts_every_radius_and_step() -> None:
    config = {
        "threat": {"norm": "linf", "eps": "8/255", "step": "eps/4"},
        "dataset": {"threat": {"eps": "8/255", "step": "eps/4"}},
        "defense": {"attack": {"step": "2/255"}},
        "eval": {"attacks": {"pgd20": {"step": "eps/8"}, "fgsm12": {"eps": "12/255", "step": "eps"},
                             "lafeat": {"head_dataset": {"threat": {"eps": "4/255", "step": "eps/4"}}}}},
        "paper": {"method": "TRADES 8/255"},
    }  # fmt: skip
    out = numeric_config(config)
    assert out["threat"] == {"norm": "linf", "eps": 8 / 255, "step": 2 / 255}
    assert out["dataset"]["threat"] == {"eps": 8 / 255, "step": 2 / 255}
    assert out["defense"]["attack"]["step"] == pytest.approx(2 / 255)
    assert out["eval"]["attacks"]["pgd20"]["step"] == pytest.approx(1 / 255)
    assert out["eval"]["attacks"]["fgsm12"] == {"eps": 12 / 255, "step": 12 / 255}
    assert out["eval"]["attacks"]["lafeat"]["head_dataset"]["threat"] == {"eps": 4 / 255, "step": 1 / 255}
    assert out["paper"]["method"] == "TRADES 8/255"  # text stays text
    assert config["threat"]["eps"] == "8/255"  # a copy


def test_console_record_keeps_lines_and_the_last_state_of_progress_bars(tmp_path: Path, monkeypatch) -> None:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    log = tmp_path / "cli.log"
    log.write_text("[hydra] a logging record\n")
    with console_record(log):
        print("epoch 1/2  loss 2.30")
        sys.stderr.write("\rbar 10%")
        sys.stderr.write("\rbar 60%")
        sys.stderr.write("\rbar 100%\n")
        print("| checkpoint | clean |")
        sys.stderr.write("warning without a newline")
    assert sys.stdout is out and sys.stderr is err  # restored
    assert "epoch 1/2" in out.getvalue() and "bar 60%" in err.getvalue()  # the console itself is unchanged
    assert log.read_text().splitlines() == [
        "[hydra] a logging record",
        "epoch 1/2  loss 2.30",
        "bar 100%",
        "| checkpoint | clean |",
        "warning without a newline",
    ]


class _OnlineRun:
    id = "eval1"

    def __init__(self) -> None:
        self.used: list[tuple[str, str]] = []
        self.summary: dict = {}

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def use_artifact(self, name: str, type: str | None = None) -> None:
        if name.startswith("model-missing"):
            raise ValueError("artifact not found")
        self.used.append((name, type or ""))

    def finish(self, exit_code: int = 0) -> None:
        pass


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_eval_run_consumes_the_training_runs_checkpoint_artifact(tmp_path: Path, monkeypatch, mode) -> None:
    run = _OnlineRun()
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    tracker = WandbTracker(
        {"mode": mode, "log_checkpoints": True}, tmp_path, {}, "eval", "sweep", [], None
    )  # fmt: skip
    used = tracker.use_checkpoint("abc123", "best")
    if mode == "offline":  # W&B refuses use_artifact offline; the config's keys link the runs
        assert not used and run.used == []
        return
    assert used and run.used == [("model-abc123:best", "model")]
    with pytest.warns(RuntimeWarning, match="could not mark model-missing:last"):
        assert not tracker.use_checkpoint("missing", "last")
    assert tracker._run is run  # a missing artifact does not disable the run
    off = WandbTracker({"mode": mode, "log_checkpoints": False}, tmp_path, {}, "e", None, [], None)
    assert not off.use_checkpoint("abc123", "best")
