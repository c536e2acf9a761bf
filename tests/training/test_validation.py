"""Config validation: each bad value is refused before any work with a message naming key and range."""

from __future__ import annotations

import pytest

from robust_train.config import to_float, validate_train_config
from robust_train.errors import ConfigError

BAD = [
    (["threat.eps=-0.1"], "threat.eps"),
    (["threat.eps=1.5"], "threat.eps"),
    (["threat.eps=abc"], "threat.eps"),
    (["threat.step=0"], "threat.step"),
    (["threat.norm=l3"], "threat.norm"),
    (["seed=-1"], "seed"),
    (["trainer.epochs=0"], "trainer.epochs"),
    (["trainer.batch_size=0"], "trainer.batch_size"),
    (["trainer.optimizer.lr=-0.1"], "trainer.optimizer.lr"),
    (["trainer.optimizer.momentum=1.5"], "trainer.optimizer.momentum"),
    (["trainer.optimizer.weight_decay=-1"], "trainer.optimizer.weight_decay"),
    (["trainer.optimizer.nesterov=true", "trainer.optimizer.momentum=0"], "nesterov"),
    (["trainer.schedule.name=linear"], "trainer.schedule.name"),
    (["trainer.schedule.gamma=2"], "trainer.schedule.gamma"),
    (["trainer.schedule.milestones=[-5]"], "milestones"),
    (["trainer.validation.pgd_steps=-1"], "trainer.validation.pgd_steps"),
    (["defense.attack.steps=2.5"], "defense.attack.steps"),
    (["defense.attack.bn_mode=frozen"], "defense.attack.bn_mode"),
    (["defense.attack.random_start=gaussian"], "defense.attack.random_start"),
    (["defense.attack.restarts=0"], "defense.attack.restarts"),
    (["defense.attack=null"], "needs a training attack"),
    (["defense=standard", "+defense.attack={name: pgd, steps: 3, step: 0.01}"], "must be null"),
    (["defense=trades", "defense.beta=-1"], "defense.beta"),
    (["defense=mart", "defense.beta=x"], "defense.beta"),
    (["defense=awp", "defense.awp.gamma=2"], "defense.awp.gamma"),
    (["defense=standard", "+defense.awp={enabled: true, gamma: 0.01, warmup_epochs: 0}"], "adversarial"),
    (["model.width=0"], "model.width"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.checkpoints=[middle]"], "eval.checkpoints"),
    (["eval.attacks.pgd20.steps=-3"], "eval.attacks.pgd20.steps"),
    (["eval.attacks.autoattack_lite.version=plus"], "eval.attacks.autoattack_lite.version"),
    (["+eval.attacks.bogus={name: deepfool}"], "eval.attacks.bogus.name"),
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
    (["device=tpu:0"], "device"),
]


@pytest.mark.parametrize("overrides,fragment", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_value_is_refused_with_the_key(compose, overrides: list[str], fragment: str) -> None:
    cfg = compose(["logger=none", *overrides])  # a later logger=... in overrides wins
    with pytest.raises(ConfigError) as err:
        validate_train_config(cfg)
    assert fragment in str(err.value)


def test_several_problems_are_reported_together(compose) -> None:
    with pytest.raises(ConfigError) as err:
        validate_train_config(compose(["threat.eps=-1", "trainer.epochs=0", "logger=none"]))
    assert "threat.eps" in str(err.value) and "trainer.epochs" in str(err.value)


def test_defaults_and_every_defense_preset_validate(compose) -> None:
    for defense in ("standard", "pgd_at", "trades", "mart", "awp", "trades_awp", "mart_awp"):
        validate_train_config(compose([f"defense={defense}", "logger=none"]))


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), (0.5, 0.5), ("0.031", 0.031), (3, 3.0)])
def test_to_float_parses_fractions(text, value) -> None:
    assert to_float(text, "k") == pytest.approx(value)


@pytest.mark.parametrize("text", ["1/0", "eight", None, True, [1]])
def test_to_float_refuses_non_numbers(text) -> None:
    with pytest.raises(ConfigError, match="k="):
        to_float(text, "k")
