"""Numbers mean what they say: eps/step parsing, steps relative to eps, the suite that runs, CW labels.

Issue 12, items 1-3: a step follows eps unless written as an absolute value, an absolute L-inf PGD step
above eps is refused, `robust-eval eval=quick` runs exactly the quick suite, results carry numbers,
and CW numbers from results files of format version 1 (which ran cross-entropy) are marked.
"""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from robust_train.attacks import build_attack, build_threat
from robust_train.builders import model_from_config
from robust_train.commands.evaluate import merged_config
from robust_train.config import (
    numeric_config,
    relative_step_factor,
    resolve_step,
    to_float,
    validate_train_config,
)
from robust_train.defenses import build_defense
from robust_train.errors import ConfigError
from robust_train.report.runs import CE_AS_CW_MARK, read_results
from robust_train.tracking.checkpoint import save_checkpoint
from robust_train.tracking.results import RESULTS_FORMAT, format_table

BASE = ["debug=fast", "logger=none", "trainer.progress=false"]


@pytest.mark.parametrize(
    "text,value",
    [("8/255", 8 / 255), ("0.5/255", 0.5 / 255), (" 2 / 255 ", 2 / 255), ("0.03", 0.03), (1, 1.0)],
)
def test_numbers_and_fractions_parse(text, value) -> None:
    assert to_float(text, "threat.eps") == pytest.approx(value, rel=1e-15)


@pytest.mark.parametrize("text", ["1/0", "eps", "8//255", "a/255", ""])
def test_bad_numbers_name_the_key(text) -> None:
    with pytest.raises(ConfigError, match="threat.eps"):
        to_float(text, "threat.eps")


@pytest.mark.parametrize(
    "text,factor",
    [
        ("eps", 1.0),
        ("eps/4", 0.25),
        ("eps / 4", 0.25),
        ("0.25*eps", 0.25),
        ("eps*0.5", 0.5),
        ("2*eps/5", 0.4),
    ],
)
def test_relative_steps_scale_with_eps(text, factor) -> None:
    assert relative_step_factor(text) == pytest.approx(factor)
    assert resolve_step(text, 0.05, "threat.step") == pytest.approx(0.05 * factor)


def test_absolute_steps_do_not_follow_eps() -> None:
    assert relative_step_factor("2/255") is None and relative_step_factor(0.01) is None
    assert resolve_step("2/255", 0.5, "k") == pytest.approx(2 / 255)
    with pytest.raises(ConfigError, match="defense.attack.step='eps/x'"):
        resolve_step("eps/x", 0.1, "defense.attack.step")


def test_new_eps_alone_rescales_every_default_step(compose) -> None:
    """`robust-train threat.eps=0.01` trains, validates and evaluates with step 0.0025 (eps/4), not 0.025."""
    cfg = compose([*BASE, "threat.eps=0.01"])
    validate_train_config(cfg)
    threat = build_threat(cfg.threat)
    assert build_defense(cfg.defense, threat).attack.step_size == pytest.approx(0.0025)
    assert build_attack(cfg.eval.attacks.pgd20, threat).step_size == pytest.approx(0.0025)
    assert build_attack(cfg.eval.attacks.cw20, threat).step_size == pytest.approx(0.0025)
    numbers = numeric_config(OmegaConf.to_container(cfg, resolve=True))
    assert numbers["threat"] == {"norm": "linf", "eps": 0.01, "step": pytest.approx(0.0025)}
    assert numbers["defense"]["attack"]["step"] == pytest.approx(0.0025)
    assert numbers["eval"]["attacks"]["pgd20"]["step"] == pytest.approx(0.0025)


def test_cifar_style_eps_is_a_number_in_results(compose) -> None:
    cfg = compose([*BASE, "dataset=synthetic"])
    numbers = numeric_config(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(numbers["threat"]["eps"], float) and numbers["threat"]["eps"] == pytest.approx(8 / 255)
    assert numbers["threat"]["step"] == pytest.approx(2 / 255)
    assert numbers["dataset"]["threat"]["step"] == pytest.approx(2 / 255)


@pytest.mark.parametrize(
    "override,key",
    [
        ("threat.step=0.2", "threat.step"),
        ("defense.attack.step=0.2", "defense.attack.step"),
        ("eval.attacks.pgd20.step=0.5", "eval.attacks.pgd20.step"),
        ("eval.attacks.cw20.step=0.11", "eval.attacks.cw20.step"),
    ],
)
def test_absolute_linf_step_above_eps_is_refused(compose, override, key) -> None:
    cfg = compose([*BASE, override])  # mnist5k: eps 0.1
    with pytest.raises(ConfigError, match=rf"{key}=.*larger than eps"):
        validate_train_config(cfg)


def test_relative_or_l2_steps_above_eps_are_allowed(compose) -> None:
    validate_train_config(compose([*BASE, "defense.attack.step=1.25*eps"]))
    validate_train_config(compose([*BASE, "threat.norm=l2", "threat.eps=0.5", "threat.step=0.7"]))


def test_builder_refuses_an_absolute_step_above_eps_even_without_validation() -> None:
    threat = build_threat({"norm": "linf", "eps": 0.03})
    with pytest.raises(ConfigError, match="eval.attacks.pgd20.step"):
        build_attack({"name": "pgd", "steps": 2, "step": 0.05}, threat, key="eval.attacks.pgd20")


# ----------------------------------------------------------------------------- robust-eval


def _state(compose, *overrides: str) -> dict:
    cfg = compose([*BASE, *overrides])
    return {"config": OmegaConf.to_container(cfg, resolve=True)}


def _eval_cfg(compose, *overrides: str):
    return compose(["debug=fast", "logger=none", "checkpoint=x.pt", *overrides], config_name="evaluate")


def test_a_chosen_suite_replaces_the_stored_one(compose) -> None:
    state = _state(compose)  # trained with eval=default: clean, pgd20, cw20, autoattack_lite
    full = merged_config(_eval_cfg(compose, "eval=quick"), state, ["eval=quick"])
    assert list(full.eval.attacks) == ["clean", "pgd20"] and full.eval.name == "quick"


def test_without_a_choice_the_stored_suite_runs_with_this_commands_settings(compose) -> None:
    state = _state(compose, "eval=quick", "eval.attacks.pgd20.steps=7")
    cfg = _eval_cfg(compose, "eval.n_examples=16", "eval.attacks.pgd20.restarts=2")
    full = merged_config(cfg, state, ["eval.n_examples=16", "eval.attacks.pgd20.restarts=2"])
    assert list(full.eval.attacks) == ["clean", "pgd20"] and full.eval.name == "quick"
    assert full.eval.attacks.pgd20.steps == 7 and full.eval.attacks.pgd20.restarts == 2
    assert full.eval.n_examples == 16


def test_eval_at_another_eps_rescales_old_absolute_steps(compose) -> None:
    """A checkpoint written before steps were relative stores step 0.025 for eps 0.1."""
    state = _state(compose, "threat.step=0.025", "eval.attacks.pgd20.step=0.025")
    assert state["config"]["eval"]["attacks"]["pgd20"]["step"] == 0.025
    full = merged_config(_eval_cfg(compose, "threat.eps=0.05"), state, ["threat.eps=0.05"])
    threat = build_threat(full.threat)
    assert build_attack(full.eval.attacks.pgd20, threat).step_size == pytest.approx(0.0125)
    chosen = merged_config(
        _eval_cfg(compose, "threat.eps=0.05", "eval=quick"), state, ["threat.eps=0.05", "eval=quick"]
    )
    assert build_attack(chosen.eval.attacks.pgd20, build_threat(chosen.threat)).step_size == pytest.approx(
        0.0125
    )
    # An explicit step is the user's, kept as given.
    kept = merged_config(
        _eval_cfg(compose, "threat.eps=0.05", "threat.step=0.01", "eval=quick"),
        state,
        ["threat.eps=0.05", "threat.step=0.01", "eval=quick"],
    )
    assert build_attack(kept.eval.attacks.pgd20, build_threat(kept.threat)).step_size == pytest.approx(0.01)


def test_robust_eval_prints_and_stores_the_resolved_budget(
    cli, compose, tmp_path, capsys, monkeypatch
) -> None:
    """`robust-eval checkpoint=… eval=quick threat.eps=0.05` runs clean and PGD-20 at step 0.0125."""
    from robust_train.cli import eval_main

    cfg = compose(BASE)
    model = model_from_config(cfg.model, num_classes=10, mean=[0.1307] * 3, std=[0.3081] * 3)
    ckpt = tmp_path / "run" / "best.pt"
    state = _state(compose) | {"epoch": 1, "model": model.state_dict(), "num_classes": 10}
    save_checkpoint(state | {"mean": [0.1307] * 3, "std": [0.3081] * 3, "image_shape": [3, 32, 32]}, ckpt)
    out = tmp_path / "eval"
    argv = [
        f"checkpoint={ckpt}", "eval=quick", "threat.eps=0.05", "logger=none", "dataset.test_limit=16",
        "eval.n_examples=16", "eval.sanity.enabled=false", f"hydra.run.dir={out}",
    ]  # fmt: skip
    code, text = cli(eval_main, "robust-eval", argv)
    assert code == 0, text
    assert "pgd20 (pgd): linf eps 0.05, step 0.0125, steps 20" in text
    assert text.index("pgd20 (pgd)") < text.index("accuracy (%) on 16 test images")
    res = json.loads((out / "results.json").read_text())
    assert list(res["eval"]["best"]["attacks"]) == ["clean", "pgd20"] and res["eval"]["suite"] == "quick"
    assert res["config"]["threat"]["eps"] == 0.05 and res["config"]["threat"]["step"] == pytest.approx(0.0125)
    assert res["eval"]["best"]["attacks"]["pgd20"]["attack"]["step_size"] == pytest.approx(0.0125)


# ----------------------------------------------------------------------------- results files


def _results(version: int) -> dict:
    attack = {"name": "cw", "norm": "linf", "eps": 0.1, "step_size": 0.025, "steps": 20, "loss": "cw"}
    pgd = attack | {"name": "pgd", "loss": "ce"}
    return {
        "format": RESULTS_FORMAT, "version": version, "seed": 0, "config": {"seed": 0},
        "eval": {"n_examples": 8, "best": {"epoch": 1, "attacks": {
            "pgd20": {"accuracy": 50.0, "n": 8, "time_s": 1.0, "attack": pgd},
            "cw20": {"accuracy": 50.0, "n": 8, "time_s": 1.0, "attack": attack},
        }}},
    }  # fmt: skip


def test_cw_numbers_of_version_1_results_are_marked(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results(1)))
    attacks = read_results(path).checkpoints["best"]["attacks"]
    assert set(attacks) == {"pgd20", "cw20" + CE_AS_CW_MARK}
    path.write_text(json.dumps(_results(2)))
    assert set(read_results(path).checkpoints["best"]["attacks"]) == {"pgd20", "cw20"}


def test_report_of_version_1_results_says_cw_ran_cross_entropy(tmp_path) -> None:
    from robust_train.report import build_report, load_local_runs

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(json.dumps(_results(1)))
    report = build_report(load_local_runs([tmp_path]), tmp_path / "report", plots=False)
    assert "cw20" + CE_AS_CW_MARK in report.markdown and "they are PGD numbers" in report.markdown


def test_results_table_shows_each_attacks_budget_above_the_numbers() -> None:
    table = format_table(_results(2)["eval"])
    lines = table.splitlines()
    assert lines[0] == "pgd20 (pgd): linf eps 0.1, step 0.025, steps 20, loss ce"
    assert lines[1] == "cw20 (cw): linf eps 0.1, step 0.025, steps 20, loss cw"
    assert lines[2].startswith("accuracy (%) on 8 test images")
