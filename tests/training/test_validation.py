"""Config validation: each bad value is refused before any work with a message naming key and range."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from robust_train.attacks import Attack, AttackConfig, ThreatModel, build_attack, build_threat
from robust_train.builders import model_from_config
from robust_train.config import to_float, validate_eval_config, validate_train_config
from robust_train.defenses import build_defense
from robust_train.errors import ConfigError
from robust_train.models import ModelConfig, model_names
from robust_train.registry import ATTACKS, MODELS, Entry
from robust_train.schema import PositiveInt, UnitNumber

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


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override,line",
    [
        ("+threat.epsilon=0.05", "threat.epsilon is not a known key; did you mean `threat.eps`?"),
        ("+trainer.epochz=3", "trainer.epochz is not a known key; did you mean `trainer.epochs`?"),
        ("+trainer.optimizer.moment=0.5",
         "trainer.optimizer.moment is not a known key; did you mean `trainer.optimizer.momentum`?"),
        ("+eval.attacks.pgd20.stepz=0.01",
         "eval.attacks.pgd20.stepz is not a known key; did you mean `eval.attacks.pgd20.step`?"),
        ("+dataset.val_sise=10", "dataset.val_sise is not a known key; did you mean `dataset.val_size`?"),
        ("+seeds=1", "seeds is not a known key; did you mean `seed`?"),
        ("+model.widht=2",
         "model.widht is not an option of model 'preact_resnet18'; did you mean `model.width`?"),
    ],
)  # fmt: skip
def test_a_plus_key_the_code_never_reads_is_refused_with_the_closest_name(compose, override, line) -> None:
    with pytest.raises(ConfigError) as err:
        validate_train_config(compose(["logger=none", override]))
    assert str(err.value).startswith(line), str(err.value)


# ----------------------------------------------------------------------------- defaults exist once

CONF = Path(__file__).resolve().parents[2] / "robust_train" / "conf"


def _schema_of(group: str, node: dict):
    from robust_train.config import EvalConfig
    from robust_train.registry import ATTACKS, DATASETS, MODELS
    from robust_train.tracking.wandb_run import LOGGERS
    from robust_train.training.trainer import TrainerConfig

    if group == "attack":
        return ATTACKS.get(node.get("name") or "lafeat").schema  # lafeat_full extends lafeat
    if group == "dataset":
        return DATASETS.get(node["name"]).schema
    if group == "model":
        return MODELS.get(node["name"]).schema
    if group == "logger":
        return LOGGERS[node["name"]]
    return {"trainer": TrainerConfig, "eval": EvalConfig}[group]


def _leaves(node: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out: dict[tuple[str, ...], object] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


GROUP_FILES = sorted(
    str(p.relative_to(CONF))
    for group in ("trainer", "eval", "attack", "dataset", "model", "logger")
    for p in (CONF / group).glob("*.yaml")
)


@pytest.mark.parametrize("path", GROUP_FILES)
def test_group_files_list_only_values_that_differ_from_the_schema(compose, path: str) -> None:
    from robust_train.schema import defaults_node

    group, name = path.removesuffix(".yaml").split("/")
    raw = OmegaConf.to_container(OmegaConf.load(CONF / path), resolve=False)
    raw.pop("defaults", None)
    schema = _schema_of(group, raw)
    defaults = _leaves(defaults_node(schema, raw.get("name")))
    for key, value in _leaves(raw).items():
        if key == ("name",):
            continue
        assert key in defaults, f"{path}: {'.'.join(key)} is not a key of {schema.__name__}"
        assert value != defaults[key], f"{path}: {'.'.join(key)}={value!r} repeats the schema default"
    # Composed, the node carries every key of its schema (so `key=value` overrides need no `+`).
    if group in ("trainer", "eval", "dataset", "model", "logger"):
        composed = compose([f"{group}={name}", "logger=none"] if group != "logger" else [f"logger={name}"])
        assert set(schema.model_fields) <= set(composed[group]), path


def test_defaults_come_from_the_schema(compose) -> None:
    from robust_train.training.trainer import TrainerConfig

    cfg = compose(["logger=none"])
    assert OmegaConf.to_container(cfg.trainer, resolve=True) == TrainerConfig().model_dump()
    assert cfg.eval.attacks.pgd20.restarts == 1 and cfg.eval.attacks.cw20.steps == 20  # PGDConfig, CWConfig
    assert compose(["logger=none", "trainer.nan.max_skips=3"]).trainer.nan.max_skips == 3  # no `+` needed


# ----------------------------------------------------------------------------- plugins through the registries


class _NoiseConfig(AttackConfig):
    scale: UnitNumber = 0.5


class _Noise(Attack):
    """Signed noise of `scale * eps` (a stand-in for an attack defined in a user's package)."""

    name = "noise"

    def __init__(self, threat: ThreatModel, scale: float) -> None:
        super().__init__()
        self.threat, self.scale = threat, scale

    def perturb(self, model, x, y, objective):
        return (x + self.scale * self.threat.eps * torch.randn_like(x).sign()).clamp(0, 1)


def test_an_attack_registered_outside_the_package_is_selected_by_name(compose, monkeypatch) -> None:
    monkeypatch.setitem(ATTACKS._entries, "noise", Entry("noise", _Noise, _NoiseConfig, __name__))
    cfg = compose(["logger=none", "+eval.attacks.noise={name: noise, scale: 0.25}"])
    OmegaConf.update(cfg, "defense.attack", {"name": "noise"}, merge=False)
    validate_train_config(cfg)
    threat = build_threat(cfg.threat)
    attack = build_attack(cfg.eval.attacks.noise, threat, key="eval.attacks.noise")
    assert isinstance(attack, _Noise) and attack.scale == 0.25
    assert isinstance(build_defense(cfg.defense, threat).attack, _Noise)
    OmegaConf.update(cfg, "eval.attacks.noise", {"name": "noise", "scal": 0.25}, merge=False)
    with pytest.raises(ConfigError, match=r"eval.attacks.noise.scal is not a known key; did you mean "):
        validate_train_config(cfg)
    OmegaConf.update(cfg, "eval.attacks.noise", {"name": "nois"}, merge=False)
    with pytest.raises(ConfigError, match=r"eval.attacks.noise.name='nois' is not a known attack; did you "):
        validate_train_config(cfg)


class _TinyNetConfig(ModelConfig):
    hidden: PositiveInt = 8


def _tiny_net(num_classes, mean, std, width, normalize, hidden) -> nn.Module:
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, hidden), nn.Linear(hidden, num_classes)
    )


def test_a_model_registered_outside_the_package_is_selected_by_name(compose, monkeypatch) -> None:
    monkeypatch.setitem(MODELS._entries, "tiny_net", Entry("tiny_net", _tiny_net, _TinyNetConfig, __name__))
    cfg = compose(["logger=none", "dataset=synthetic"])
    OmegaConf.update(cfg, "model", {"name": "tiny_net", "hidden": 4}, merge=False)
    validate_train_config(cfg)
    net = model_from_config(cfg.model, num_classes=10, mean=[0.5] * 3, std=[0.25] * 3)
    assert net[2].out_features == 4 and "tiny_net" in model_names()
    OmegaConf.update(cfg, "model", {"name": "tiny_net", "hiden": 4}, merge=False)
    with pytest.raises(ConfigError, match=r"model.hiden is not an option of model 'tiny_net'; did you mean "):
        validate_train_config(cfg)


# ----------------------------------------------------------------------------- robust-eval's own keys


def test_robust_eval_refuses_unknown_top_level_keys(compose) -> None:
    cfg = compose(["logger=none", "checkpoint=x.pt", "+sead=3"], config_name="evaluate")
    with pytest.raises(ConfigError, match=r"sead is not a known key; did you mean `seed`\?"):
        validate_eval_config(cfg)
    validate_eval_config(compose(["logger=none", "checkpoint=x.pt", "debug=fast"], config_name="evaluate"))
