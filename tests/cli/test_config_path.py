"""Config folders outside the package: a user's own (hydra.searchpath or $ROBUST_TRAIN_CONFIG_PATH) and
installed plugins' `conf/` folders compose with ours; completion and --help list nested presets.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from robust_train import hydra_ext
from robust_train.cli import eval_main, train_main
from robust_train.registry import PLUGIN_GROUP

BASE = ["debug=fast", "logger=none", "trainer.progress=false"]


def run_main(argv: list[str], capsys, monkeypatch, main=train_main, prog: str = "robust-train") -> str:
    """train_main in-process for commands that return normally (--cfg, --help, completion, a run).

    Returns what it printed to stdout (stderr may carry logging noise of earlier in-process runs).
    """
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", [prog, *argv])
    GlobalHydra.instance().clear()
    try:
        main()
    except SystemExit as exc:  # --help exits 0
        assert exc.code in (0, None), capsys.readouterr()
    return capsys.readouterr().out


def job_config(argv: list[str], capsys, monkeypatch):
    return OmegaConf.create(run_main([*argv, "--cfg", "job"], capsys, monkeypatch))


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def user_conf(tmp_path: Path) -> Path:
    """A user's config folder: an experiment selecting their model and their evaluation suite."""
    conf = tmp_path / "my_conf"
    write(conf / "model" / "my_net.yaml", "name: preact_resnet18\nwidth: 0.125\n")
    write(
        conf / "eval" / "my_suite.yaml",
        "defaults:\n  - /attack@attacks.clean: clean\n  - /attack@attacks.fgsm: fgsm\n  - _self_\n"
        "name: my_suite\nn_examples: 32\nbatch_size: 32\ncheckpoints: [last]\n",
    )
    write(
        conf / "experiment" / "mine.yaml",
        "# @package _global_\ndefaults:\n  - override /model: my_net\n  - override /eval: my_suite\n"
        "trainer:\n  epochs: 1\nseed: 3\n",
    )
    return conf


def _assert_mine(cfg) -> None:
    assert cfg.model.name == "preact_resnet18" and cfg.model.width == 0.125
    assert cfg.eval.name == "my_suite" and set(cfg.eval.attacks) == {"clean", "fgsm"}
    assert cfg.eval.attacks.fgsm.name == "fgsm" and cfg.seed == 3
    assert cfg.defense.name == "pgd_at" and cfg.dataset.name == "mnist5k"  # ours, untouched


def test_user_folder_on_the_command_line(user_conf, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = job_config([f"hydra.searchpath=[file://{user_conf}]", "experiment=mine"], capsys, monkeypatch)
    _assert_mine(cfg)


def test_user_folder_from_the_environment(user_conf, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(hydra_ext.CONFIG_PATH_ENV, f"/nonexistent/conf{':'}{user_conf}")
    cfg = job_config(["experiment=mine"], capsys, monkeypatch)
    _assert_mine(cfg)
    # The groups can also be picked one by one, and the user's options are listed like ours.
    cfg = job_config(["model=my_net", "eval=my_suite"], capsys, monkeypatch)
    assert cfg.model.width == 0.125 and cfg.eval.name == "my_suite"
    help_text = run_main(["--help"], capsys, monkeypatch)
    assert "my_net" in help_text and "my_suite" in help_text


def test_missing_environment_folder_is_reported(monkeypatch, capsys) -> None:
    monkeypatch.setenv(hydra_ext.CONFIG_PATH_ENV, "/nonexistent/conf")
    assert hydra_ext.user_config_paths() == []
    assert "/nonexistent/conf" in capsys.readouterr().err


def test_user_experiment_runs(user_conf, tmp_path, capsys, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    run_main(
        [*BASE, f"hydra.searchpath=[file://{user_conf}]", "experiment=mine", f"hydra.run.dir={run_dir}"],
        capsys,
        monkeypatch,
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["eval"]["last"]["attacks"]) == {"clean", "fgsm"}
    assert results["config"]["eval"]["name"] == "my_suite" and results["seed"] == 3


def test_installed_plugin_conf_is_searched(tmp_path, capsys, monkeypatch) -> None:
    """The `conf/` beside a module announced under `robust_train.plugins` joins the search path."""
    package = tmp_path / "site" / "my_rt_plugin"
    write(package / "__init__.py", "")
    write(
        package / "conf" / "defense" / "my_defense.yaml", "defaults:\n  - pgd_at\n  - _self_\nname: pgd_at\n"
    )
    write(package / "conf" / "attack" / "my_attack.yaml", "name: fgsm\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = metadata.EntryPoint(name="mine", value="my_rt_plugin", group=PLUGIN_GROUP)
    monkeypatch.setattr(
        hydra_ext.metadata, "entry_points", lambda group: [entry] if group == PLUGIN_GROUP else []
    )
    monkeypatch.chdir(tmp_path)
    assert hydra_ext.plugin_config_dirs() == [(package / "conf").resolve()]
    cfg = job_config(["defense=my_defense", "+attack@eval.attacks.mine=my_attack"], capsys, monkeypatch)
    assert cfg.defense.name == "pgd_at" and cfg.eval.attacks.mine.name == "fgsm"
    info = run_main(["--info", "searchpath"], capsys, monkeypatch)
    assert f"file://{(package / 'conf').resolve()}" in info


def test_search_path_plugin_leaves_other_apps_alone(monkeypatch, tmp_path) -> None:
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    monkeypatch.setenv(hydra_ext.CONFIG_PATH_ENV, str(tmp_path))
    other = ConfigSearchPathImpl()
    other.append("main", f"file://{tmp_path / 'someone_elses_conf'}")
    hydra_ext.RobustTrainSearchPath().manipulate_search_path(other)
    assert [e.path for e in other.get_path()] == [f"file://{tmp_path / 'someone_elses_conf'}"]
    ours = ConfigSearchPathImpl()
    ours.append("main", "pkg://robust_train.conf")
    hydra_ext.RobustTrainSearchPath().manipulate_search_path(ours)
    assert f"file://{tmp_path}" in [e.path for e in ours.get_path()]


# ----------------------------------------------------------------------------- completion and help


def complete(line: str, capsys, monkeypatch) -> list[str]:
    monkeypatch.setenv("COMP_LINE", line)
    return run_main(["-sc", "query=bash"], capsys, monkeypatch).split()


def test_completion_lists_nested_presets(capsys, monkeypatch) -> None:
    found = complete("robust-train experiment=", capsys, monkeypatch)
    assert "experiment=demo" in found and "experiment=base/trades_wrn34" in found
    assert "experiment=sat/sat_wrn28" in found
    found = complete("robust-train debug=fast experiment=base/trades_", capsys, monkeypatch)
    assert set(found) == {
        "experiment=base/trades_awp_prn18", "experiment=base/trades_awp_wrn34",
        "experiment=base/trades_prn18", "experiment=base/trades_wrn34",
    }  # fmt: skip


def test_completion_of_packaged_group_and_plain_group(capsys, monkeypatch) -> None:
    found = complete("robust-train +attack@eval.attacks.x=pgd", capsys, monkeypatch)
    assert set(found) == {"+attack@eval.attacks.x=pgd20", "+attack@eval.attacks.x=pgd_l2"}
    found = complete("robust-train model=wrn", capsys, monkeypatch)
    assert set(found) == {
        "model=wrn28_10", "model=wrn34_10", "model=wrn34_20", "model=wrn28_10_silu", "model=wrn34_10_silu",
        "model=wrn34_20_silu", "model=wrn70_16_silu", "model=wrn82_8_silu", "model=wrn94_16_silu",
        "model=wrn106_16_silu",
    }  # fmt: skip


def test_help_lists_nested_presets(capsys, monkeypatch) -> None:
    text = run_main(["--help"], capsys, monkeypatch)
    assert "robust-train is powered by Hydra" in text
    assert "experiment/base: " in text and "trades_wrn34" in text
    assert "\nattack: " in text and "\ndefense: " in text
    assert "schema" not in text  # the schemas' defaults are stored as configs, for composition only


def test_eval_help_and_completion_offer_only_its_groups(capsys, monkeypatch) -> None:
    text = run_main(["--help"], capsys, monkeypatch, eval_main, "robust-eval")
    assert text.startswith("robust-eval: evaluate a model")
    groups = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = {line.split(":")[0] for line in groups.splitlines() if ": " in line}
    assert listed == {"attack", "debug", "eval", "logger"}
    monkeypatch.setenv("COMP_LINE", "robust-eval ")
    found = run_main(["-sc", "query=bash"], capsys, monkeypatch, eval_main, "robust-eval").split()
    assert "eval=" in found and "defense=" not in found and not any("schema" in f for f in found)
