"""Hydra's own typo errors, unused groups and unknown `+` keys: one line, exit code 2, nothing written.

In-process through the real entry points (`train_main`/`eval_main` with a patched sys.argv), from an empty
working directory so that anything a refused command writes would show up.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from robust_train.cli import eval_main, train_main

BASE = ["debug=fast", "logger=none", "trainer.progress=false"]


def assert_one_line_refusal(code: int, text: str, prog: str, workdir: Path, *fragments: str) -> None:
    lines = text.strip().splitlines()
    assert code == 2, text
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), text
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert list(workdir.iterdir()) == [], f"a refused command wrote {list(workdir.rglob('*'))}"


TRAIN_TYPOS: list[tuple[list[str], list[str]]] = [
    (["defence=trades"], ["defence is not a known key or config group", "did you mean `defense`?"]),
    (["+defence=trades"], ["defence is not a known key or config group", "did you mean `defense`?"]),
    (["~defence"], ["defence", "did you mean `defense`?"]),
    (["experiment=trades_wrn34"],
     ["experiment=trades_wrn34 is not a known option of `experiment`", "did you mean `base/trades_wrn34`?",
      "base/trades_awp_wrn34", "sat/sat_wrn28", "demo"]),
    (["experiment=base/trades_wrn43"], ["did you mean `base/trades_wrn34`?"]),
    (["model=wrn34"], ["model=wrn34 is not a known option of `model`",
                       "did you mean `wrn34_10` or `wrn34_20`?", "preact_resnet18"]),
    (["model=resnet1000"], ["model=resnet1000", "preact_resnet18", "wrn34_10"]),
    (["addons=[nope]"], ["nope is not a known option of `addons`", "sat", "slim"]),
    (["addons=[sta]"], ["did you mean `sat`?"]),
    (["trainer.epochz=3"], ["trainer.epochz is not a known key", "did you mean `trainer.epochs`?"]),
    (["trainer.optimizer.lrr=0.1"], ["trainer.optimizer.lrr is not a known key",
                                     "did you mean `trainer.optimizer.lr`?"]),
    (["+attack=pgd20"], ["`attack` options are placed with a package", "+attack@eval.attacks.NAME=pgd20"]),
]  # fmt: skip


@pytest.mark.parametrize("overrides,fragments", TRAIN_TYPOS, ids=[" ".join(c[0]) for c in TRAIN_TYPOS])
def test_train_typo_is_one_line(cli, overrides, fragments, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, text = cli(train_main, "robust-train", [*BASE, *overrides])
    assert_one_line_refusal(code, text, "robust-train", tmp_path, *fragments)


EVAL_CASES: list[tuple[list[str], list[str]]] = [
    (["defense=trades"], ["`defense` is not a config group of robust-eval", "takes: eval, logger, debug"]),
    (["+defense=trades"], ["`defense` is not a config group of robust-eval"]),
    (["experiment=base/trades_wrn34"], ["`experiment` is not a config group of robust-eval"]),
    (["eval=qiuck"], ["eval=qiuck is not a known option of `eval`", "did you mean `quick`?"]),
    (["+defence=trades"], ["defence is not a known key or config group"]),
]


@pytest.mark.parametrize("overrides,fragments", EVAL_CASES, ids=[" ".join(c[0]) for c in EVAL_CASES])
def test_eval_group_it_does_not_use_is_refused(
    cli, overrides, fragments, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    argv = ["checkpoint=missing.pt", "logger=none", *overrides]
    code, text = cli(eval_main, "robust-eval", argv)
    assert_one_line_refusal(code, text, "robust-eval", tmp_path, *fragments)


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("+threat.epsilon=0.05", ["threat.epsilon is not a known key", "did you mean `threat.eps`?"]),
        ("+trainer.epochz=3", ["trainer.epochz is not a known key", "did you mean `trainer.epochs`?"]),
        ("threat.eps=-0.1", ["threat.eps=-0.1", "out of range"]),
    ],
)
def test_refused_run_leaves_no_run_dir(cli, override, fragments, tmp_path, capsys, monkeypatch) -> None:
    """Schema errors surface inside the job, after Hydra made the run dir: the dir is removed again."""
    monkeypatch.chdir(tmp_path)
    code, text = cli(train_main, "robust-train", [*BASE, override])
    errors = [line for line in text.splitlines() if line.startswith("robust-train: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in errors[0], text
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


def test_refused_run_keeps_a_dir_that_existed(cli, tmp_path, capsys, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    argv = [*BASE, "threat.eps=-0.1", f"hydra.run.dir={run_dir}"]
    code, _ = cli(train_main, "robust-train", argv)
    assert code == 2
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_eval_without_checkpoint_writes_nothing(cli, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, text = cli(eval_main, "robust-eval", ["logger=none"])
    assert_one_line_refusal(code, text, "robust-eval", tmp_path, "checkpoint is required")


def test_grammar_errors_keep_hydra_message(cli, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, text = cli(train_main, "robust-train", [*BASE, "trainer.epochs=[1,"])
    assert code == 1 and "no viable alternative" in text and "Traceback" not in text, text


def test_full_error_env_still_raises(tmp_path, monkeypatch) -> None:
    """HYDRA_FULL_ERROR=1 is for debugging the config itself: Hydra's exception comes through."""
    from hydra.errors import ConfigCompositionException

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["robust-train", *BASE, "defence=trades"])
    GlobalHydra.instance().clear()
    with pytest.raises(ConfigCompositionException):
        train_main()


@pytest.mark.parametrize("override", ["defense=pgd_at,tradez", "+defence=trades,mart"])
def test_refused_sweep_writes_nothing(cli, override, tmp_path, capsys, monkeypatch) -> None:
    """A sweep whose options are checked only after Hydra made its dir (and multirun.yaml) removes it."""
    monkeypatch.chdir(tmp_path)
    argv = ["-m", *BASE, override, f"hydra.sweep.dir={tmp_path / 'sweeps' / 'x'}"]
    code, text = cli(train_main, "robust-train", argv)
    assert_one_line_refusal(code, text, "robust-train", tmp_path, "did you mean")
