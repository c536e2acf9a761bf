"""robust-report on fixture run directories (results.json written here) and on a fake W&B Api."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from robust_train.cli import report_main
from robust_train.errors import ResultsError
from robust_train.report import build_report, load_local_runs, load_wandb_runs
from robust_train.tracking.results import RESULTS_FORMAT, RESULTS_VERSION

PAPER = {
    "method": "TRADES", "verified": True, "source": "Table 4",
    "results": {
        "table4": {"clean": 80.0, "pgd20": 50.0, "autoattack": 45.0},
        "last": {"pgd20": [40.0, 42.0]},
    },
}  # fmt: skip


def _config(defense: str, seed: int, eps: float = 0.1, paper: dict | None = None) -> dict:
    return {"seed": seed, "dataset": {"name": "mnist5k"}, "model": {"name": "preact_resnet18"},
            "defense": {"name": defense, "beta": 6.0 if defense == "trades" else None}, "addons": {},
            "threat": {"norm": "linf", "eps": eps}, "logger": {"name": "none"}, "paper": paper}  # fmt: skip


def _write(
    run_dir: Path, defense: str, seed: int, clean: float, pgd: float, eps: float = 0.1, paper=None
) -> None:
    run_dir.mkdir(parents=True)
    attacks = {
        "clean": {"accuracy": clean, "n": 100, "time_s": 0.5, "attack": {"name": "clean"}},
        "pgd20": {"accuracy": pgd, "n": 100, "time_s": 2.0, "attack": {"name": "pgd", "eps": eps}},
    }
    res = {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
        "config": _config(defense, seed, eps, paper), "seed": seed,
        "train": {"history": [
            {"epoch": e, "val/clean_acc": clean - 3 + e, "val/robust_acc": pgd - 3 + e} for e in (1, 2, 3)
        ]},
        "eval": {
            "n_examples": 100, "best": {"epoch": 2, "attacks": attacks},
            "last": {
                "epoch": 3,
                "attacks": {k: {**v, "accuracy": v["accuracy"] - 1} for k, v in attacks.items()},
            },
        },
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(res))


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    _write(root / "0", "pgd_at", 0, 90.0, 40.0)
    _write(root / "1", "pgd_at", 1, 92.0, 44.0)
    _write(root / "2", "trades", 0, 85.0, 50.0, paper=PAPER)
    _write(root / "3", "trades", 1, 87.0, 52.0, paper=PAPER)
    (root / "4").mkdir()
    (root / "4" / "error.json").write_text(json.dumps({"overrides": ["defense=mart"], "error": "boom"}))
    return root


def test_report_groups_seeds_and_sets_papers_beside(sweep: Path, tmp_path: Path) -> None:
    report = build_report(load_local_runs([sweep]), tmp_path / "out")
    md = report.markdown
    assert [g.label for g in report.groups] == ["pgd_at", "trades"]
    assert "| pgd_at | best | 2 | 2.0 ± 0.0 | 91.00 ± 1.41 | 42.00 ± 2.83 |" in md
    assert "| trades | last | 2 | 3.0 ± 0.0 | 85.00 ± 1.41 | 50.00 ± 1.41 |" in md
    # Paper row table4 against our best: pgd20 51 vs 50 -> +1.00; the last row's range against our last.
    assert "| trades | table4 | best | pgd20 | 50.00 | 51.00 ± 1.41 | +1.00 |" in md
    assert "| trades | last | last | pgd20 | 40.00–42.00 | 50.00 ± 1.41 | +8.00 |" in md
    assert "table4.autoattack" in md  # a paper column we did not run is named
    assert "boom" in md and "defense=mart" in md  # the failed job
    assert {p.name for p in report.plots} == {
        "robust_by_attack.png",
        "clean_vs_robust.png",
        "accuracy_vs_epoch.png",
    }
    assert all(p.stat().st_size > 1000 for p in report.plots)


def test_failed_sanity_checks_are_loud_in_the_runs_table(sweep: Path, tmp_path: Path) -> None:
    path = sweep / "1" / "results.json"
    res = json.loads(path.read_text())
    res["eval"]["best"]["sanity"] = {"passed": False, "failed": ["gradient_health", "large_eps"]}
    res["eval"]["last"]["sanity"] = {"passed": True, "failed": []}
    path.write_text(json.dumps(res))
    md = build_report(load_local_runs([sweep]), tmp_path / "out", plots=False).markdown
    row = next(line for line in md.splitlines() if line.startswith(f"| `{sweep / '1'}`"))
    assert row.endswith("| best **FAILED: gradient_health, large_eps**; last ok |")
    row0 = next(line for line in md.splitlines() if line.startswith(f"| `{sweep / '0'}`"))
    assert row0.endswith("| - |")  # no sanity record: nothing claimed


def test_robust_vs_eps_plot_when_runs_differ_in_eps(tmp_path: Path) -> None:
    for i, (eps, pgd) in enumerate([(0.1, 40.0), (0.2, 20.0), (0.3, 5.0)]):
        _write(tmp_path / "runs" / str(i), "pgd_at", 0, 90.0, pgd, eps=eps)
    report = build_report(load_local_runs([tmp_path / "runs"]), tmp_path / "out")
    assert "robust_vs_eps.png" in {p.name for p in report.plots}
    assert len(report.groups) == 3  # eps is part of the method for the tables


def test_cli_writes_report_and_refuses_empty_dirs(sweep: Path, tmp_path: Path, capsys) -> None:
    report_main([str(sweep), "--out", str(tmp_path / "r"), "--no-plots"])
    assert (tmp_path / "r" / "report.md").read_text().startswith("# robust-train report")
    with pytest.raises(SystemExit) as stop:
        report_main([str(tmp_path / "r")])
    assert stop.value.code == 2 and "no results.json" in capsys.readouterr().err


def test_results_of_another_format_version_are_refused(sweep: Path, tmp_path: Path, capsys) -> None:
    path = sweep / "0" / "results.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "version": RESULTS_VERSION + 1}))
    with pytest.raises(ResultsError, match="format version"):
        load_local_runs([sweep])
    with pytest.raises(SystemExit) as stop:
        report_main([str(sweep), "--out", str(tmp_path / "r"), "--no-plots"])
    assert stop.value.code == 2 and "format version" in capsys.readouterr().err


class _FakeRun:
    def __init__(
        self, i: int, defense: str, pgd: float, state: str = "finished", job_type: str = "train"
    ) -> None:
        self.id, self.name, self.state, self.job_type = f"id{i}", f"run{i}", state, job_type
        self.config = _config(defense, i % 2)
        self.summary = {"eval/best/clean": 90.0, "eval/best/pgd20": pgd, "eval/best/pgd20/time_s": 1.5,
                        "eval_epoch/best": 4, "eval/gap/pgd20": 1.0, "eval/n_examples": 100}  # fmt: skip

    def scan_history(self, keys=None):
        return iter([{"epoch": 1, "val/clean_acc": 80.0, "val/robust_acc": 30.0}])


class _FakeApi:
    def __init__(self) -> None:
        self.calls: list = []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return [
            _FakeRun(0, "pgd_at", 40.0),
            _FakeRun(1, "pgd_at", 42.0),
            _FakeRun(2, "trades", 50.0, "crashed"),
            # robust-eval of run 0's checkpoint, in its group: not one more seed of pgd_at
            _FakeRun(3, "pgd_at", 10.0, job_type="eval"),
        ]


def test_wandb_pull_with_a_fake_api(tmp_path: Path) -> None:
    api = _FakeApi()
    runs = load_wandb_runs("me/robust-train", group="sweep-1", api=api)
    assert api.calls == [("me/robust-train", {"group": "sweep-1"})]
    assert set(runs[0].checkpoints) == {"best"}  # eval/gap/* is not a checkpoint
    assert (
        runs[0].checkpoints["best"]["epoch"] == 4
        and runs[0].checkpoints["best"]["attacks"]["pgd20"]["time_s"] == 1.5
    )
    assert runs[2].status == "failed" and len(runs) == 3
    report = build_report(runs, tmp_path / "w", plots=False)
    assert "| pgd_at | best | 2 | 4.0 ± 0.0 | 90.00 ± 0.00 | 41.00 ± 1.41 |" in report.markdown
    with pytest.raises(ResultsError, match="ENTITY/PROJECT"):
        load_wandb_runs("no-slash", api=api)


def _write_eval_only(run_dir: Path, identity: dict, kind: str, clean: float) -> None:
    """results.json of `robust-eval` on weights robust-train did not train: no defense, no trainer."""
    run_dir.mkdir(parents=True)
    attacks = {"clean": {"accuracy": clean, "n": 100, "time_s": 0.5, "attack": {"name": "clean"}}}
    res = {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION, "seed": 0,
        "config": {"seed": 0, "dataset": {"name": "cifar10"}, "model": {"name": "wrn28_10_silu"},
                   "threat": {"norm": "linf", "eps": 8 / 255}, "logger": {"name": "none"}},
        "model": identity, "train": {},
        "eval": {"n_examples": 100, kind: {"epoch": -1, "attacks": attacks}},
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(res))


def test_models_robust_train_did_not_train_are_labelled_by_their_identity(tmp_path: Path) -> None:
    root = tmp_path / "evals"
    zoo = {"source": "robustbench", "name": "Wang2023Better_WRN-28-10", "sha256": "a" * 64}
    _write_eval_only(root / "0", zoo, "robustbench", 92.0)
    _write_eval_only(
        root / "1", {**zoo, "name": "Other2024_WRN-28-10", "sha256": "b" * 64}, "robustbench", 90.0
    )
    _write_eval_only(
        root / "2", {"source": "state_dict", "name": "mine", "sha256": "c" * 64}, "state_dict", 80.0
    )
    report = build_report(load_local_runs([root]), tmp_path / "out", plots=False)
    assert [g.label for g in report.groups] == [
        "robustbench:Other2024_WRN-28-10", "robustbench:Wang2023Better_WRN-28-10", "state_dict:mine",
    ]  # fmt: skip
    assert "| robustbench:Wang2023Better_WRN-28-10 | robustbench | 1 | -1.0 | 92.00 |" in report.markdown


def test_weight_averaged_runs_get_an_ema_row_and_best_says_which_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write(run, "trades", 0, 85.0, 50.0)
    res = json.loads((run / "results.json").read_text())
    res["eval"]["best"]["weights"], res["eval"]["last"]["weights"] = "ema", "trained"
    res["eval"]["ema"] = {**res["eval"]["last"], "weights": "ema", "epoch": 3}
    res["eval"]["ema"]["attacks"] = {
        k: {**v, "accuracy": v["accuracy"] + 2} for k, v in res["eval"]["last"]["attacks"].items()
    }
    (run / "results.json").write_text(json.dumps(res))
    md = build_report(load_local_runs([run]), tmp_path / "out", plots=False).markdown
    assert "| trades | best (ema) | 1 | 2.0 | 85.00 | 50.00 |" in md
    assert "| trades | last | 1 | 3.0 | 84.00 | 49.00 |" in md
    assert "| trades | ema | 1 | 3.0 | 86.00 | 51.00 |" in md


def test_a_runs_own_robust_eval_results_are_not_counted_as_another_seed(sweep: Path) -> None:
    # robust-eval writes beside the checkpoint: <run>/eval/<suite>-<kind>-<time>/results.json
    before = len(load_local_runs([sweep]))
    _write(sweep / "0" / "eval" / "quick-best-2026-12-06_10-00-00", "pgd_at", 0, 10.0, 1.0)
    runs = load_local_runs([sweep])
    assert len(runs) == before and all("eval" not in Path(r.name).parts for r in runs)
    # Asked for by name, the evaluation is reported.
    [evaluation] = load_local_runs([sweep / "0" / "eval"])
    assert evaluation.checkpoints["best"]["attacks"]["clean"]["accuracy"] == 10.0
