"""Multirun: one W&B run per job in one group with job_type and tags; a failed job is recorded and marked
failed without stopping the others; launcher, Optuna and W&B-sweep configs compose; W&B extras."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import wandb
import yaml

from robust_train import cli
from robust_train.commands.train import train_run
from robust_train.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "debug=fast", "trainer.progress=false", "eval=quick", "eval.n_examples=16", "eval.checkpoints=[last]",
    "trainer.validation.pgd_steps=1", "trainer.max_batches=2",
]  # fmt: skip


class FakeRun:
    """Stands in for a wandb run; records what the tracker does with it."""

    def __init__(self, kwargs: dict) -> None:
        self.kwargs = kwargs
        self.id = f"fake{len(FakeRun.made)}"
        self.summary: dict = {}
        self.logged: list[dict] = []
        self.artifacts: list[tuple] = []
        self.finished: list[int] = []
        self.preempting = False
        FakeRun.made.append(self)

    made: list[FakeRun] = []

    def define_metric(self, *args, **kwargs) -> None:
        pass

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.logged.append(metrics)

    def log_artifact(self, artifact, aliases=None) -> None:
        self.artifacts.append((artifact, list(aliases or [])))

    def mark_preempting(self) -> None:
        self.preempting = True

    def finish(self, exit_code: int = 0) -> None:
        self.finished.append(exit_code)


@pytest.fixture
def fake_wandb(monkeypatch) -> list[FakeRun]:
    FakeRun.made = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: FakeRun(kwargs))
    return FakeRun.made


def _multirun(monkeypatch, *overrides: str) -> int:
    """robust-train -m OVERRIDES in this process (basic launcher); returns the exit status."""
    monkeypatch.setattr(sys, "argv", ["robust-train", "-m", *overrides])
    try:
        cli.train_main()
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def test_sweep_groups_runs_and_survives_failed_jobs(fake_wandb, monkeypatch, tmp_path: Path, capsys) -> None:
    from robust_train.commands import train as run_module
    from robust_train.training.trainer import Trainer

    real_validate, real_epoch = run_module.validate_train_config, Trainer.train_epoch

    def validate(cfg):  # job seed=2: a user error before anything starts
        if cfg.seed == 2:
            raise ConfigError("trainer.epochs=-3 is invalid; allowed: an integer >= 1")
        real_validate(cfg)

    def train_epoch(self, *args, **kwargs):  # job seed=1: a crash in mid-training, after W&B started
        if self.cfg.seed == 1:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(run_module, "validate_train_config", validate)
    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    sweep = tmp_path / "my-sweep"
    status = _multirun(
        monkeypatch, *TINY, "logger=wandb", "addons=[slim]", "seed=0,1,2", f"hydra.sweep.dir={sweep}"
    )
    err = capsys.readouterr().err
    assert status == cli.EXIT_JOB_FAILED
    # Every job ran in its own dir; the good one finished although the others failed.
    assert (
        json.loads((sweep / "0" / "results.json").read_text())["eval"]["last"]["attacks"]["clean"]["n"] == 16
    )
    for num, fragment in ((1, "illegal memory access"), (2, "trainer.epochs=-3")):
        record = json.loads((sweep / str(num) / cli.JOB_ERROR_FILE).read_text())
        assert fragment in record["error"] and f"seed={num}" in record["overrides"]
        assert fragment in err
    assert record["user_error"] and record["traceback"] is None
    assert "2 job(s) of the sweep" in err
    assert not (sweep / "0" / cli.JOB_ERROR_FILE).exists()
    # One W&B run per job that reached training (seed 2 failed before), one group, job_type and tags.
    assert len(fake_wandb) == 2
    for run in fake_wandb:
        kw = run.kwargs
        assert kw["group"] == "my-sweep" and kw["job_type"] == "train"
        assert {"dataset:mnist5k", "model:preact_resnet18", "defense:pgd_at", "addon:slim"} <= set(kw["tags"])
    assert fake_wandb[0].finished == [0] and fake_wandb[1].finished == [1]
    # Per-attack timing in the summary.
    assert (
        fake_wandb[0].summary["eval/last/clean/time_s"] >= 0 and fake_wandb[0].summary["eval_epoch/last"] == 1
    )


@pytest.mark.slow
def test_rerun_of_a_failed_job_clears_its_error_record(monkeypatch, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / cli.JOB_ERROR_FILE).write_text('{"error": "old"}')
    assert _multirun(monkeypatch, *TINY, "logger=none", "seed=0", f"hydra.sweep.dir={sweep}") == 0
    assert not (sweep / "0" / cli.JOB_ERROR_FILE).exists()


@pytest.mark.slow
def test_optuna_search_gets_the_best_robust_validation_accuracy(monkeypatch, tmp_path: Path) -> None:
    sweep = tmp_path / "optuna"
    status = _multirun(
        monkeypatch, "hparams_search=trades_sat", *TINY, "logger=none", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1", f"hydra.sweep.dir={sweep}",
    )  # fmt: skip
    assert status == 0
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    values = [
        json.loads((sweep / str(i) / "results.json").read_text())["train"]["best"]["val_robust_acc"]
        for i in (0, 1)
    ]
    assert best["best_value"] == max(values)
    assert set(best["best_params"]) == {"defense.beta", "addons.sat.lam"}


@pytest.mark.parametrize(
    ("launcher", "keys"),
    [
        ("joblib", {"n_jobs": 2}),
        ("submitit_local", {"timeout_min": 60}),
        ("submitit_slurm", {"partition": "gpu", "max_num_timeout": 20, "signal_delay_s": 120, "mem_gb": 32}),
    ],
)
def test_launcher_configs_compose_with_overridable_resources(launcher: str, keys: dict) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "robust_train" / "conf"), version_base="1.3"):
        extra = ["hydra.launcher.partition=gpu"] if launcher == "submitit_slurm" else []
        cfg = compose("config", [f"hydra/launcher={launcher}", *extra], return_hydra_config=True)
    node = cfg.hydra.launcher
    assert node._target_.startswith("hydra_plugins.")
    for key, value in keys.items():
        assert node[key] == value


def test_wandb_sweep_template_drives_robust_train_with_hydra_overrides(compose) -> None:
    sweep = yaml.safe_load((REPO / "sweeps" / "wandb_sweep.yaml").read_text())
    assert sweep["program"] == "robust-train"
    assert sweep["command"] == ["${env}", "${program}", "${args_no_hyphens}"]
    assert sweep["metric"] == {"name": "val/robust_acc", "goal": "maximize"}
    overrides = []
    for key, spec in sweep["parameters"].items():
        value = spec["value"] if "value" in spec else spec["values"][0] if "values" in spec else spec["max"]
        overrides.append(f"{key}={value}")
    cfg = compose(overrides)  # what one agent call runs must compose
    assert cfg.defense.name == "trades" and cfg.defense.beta == 10.0 and cfg.addons.sat.lam == 0.2


def test_wandb_extras_artifacts_and_example_images(fake_wandb, compose, tmp_path: Path) -> None:
    cfg = compose([*TINY, "logger=wandb", "logger.log_checkpoints=true", "logger.example_images=3",
                   "eval.checkpoints=[best,last]"])  # fmt: skip
    train_run(cfg, tmp_path / "run")
    run = fake_wandb[0]
    aliases = sorted(a for _, al in run.artifacts for a in al)
    assert aliases == ["best", "last"]
    assert all(art.type == "model" and art.name == f"model-{run.id}" for art, _ in run.artifacts)
    table = next(m["eval/examples"] for m in run.logged if "eval/examples" in m)
    assert table.columns[:4] == ["checkpoint", "attack", "index", "label"]
    assert len(table.data) == 3 * 2  # 3 images x (clean, pgd20)
    assert {row[1] for row in table.data} == {"clean", "pgd20"}
    assert all(row[-1] <= 0.1 + 1e-6 for row in table.data)  # linf within mnist5k's eps


def test_stop_signal_marks_the_wandb_run_preempted(fake_wandb, compose, tmp_path: Path, monkeypatch) -> None:
    from robust_train.training.trainer import Trainer

    def preempted(self, *args, **kwargs):  # what submitit's USR2 handler does after requeueing: exit
        raise SystemExit(-1)

    monkeypatch.setattr(Trainer, "train_epoch", preempted)
    with pytest.raises(SystemExit):
        train_run(compose([*TINY, "logger=wandb"]), tmp_path / "run")
    assert fake_wandb[0].preempting and fake_wandb[0].finished == [-1]  # the exit code, not 0
