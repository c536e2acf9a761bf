"""A base defense registered outside the package builds, validates and composes with the add-ons through
its declarations alone (schema, branches, a label term with its function), never through its name."""

from __future__ import annotations

import copy
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from pydantic import Field

from robust_train.addons import build_addons, check_addons, supported_defenses
from robust_train.addons.rwt import RWT
from robust_train.attacks import ThreatModel
from robust_train.defenses import DefenseConfig, build_defense, check_defense
from robust_train.defenses.awp import AWPConfig
from robust_train.defenses.base import Defense, pgd_training_attack
from robust_train.errors import ConfigError
from robust_train.models import build_model
from robust_train.registry import DEFENSES, Entry
from robust_train.schema import Number
from robust_train.step_types import LABEL, StepForwards, StepLoss, Term
from robust_train.training.step import TrainStep

EPS = 8 / 255


class _PairedConfig(DefenseConfig):
    name: Literal["paired"] = "paired"
    lam: Number = Field(default=0.5, ge=0.0)
    attack: dict[str, Any] | None = pgd_training_attack("uniform", "eval")
    awp: AWPConfig | None = Field(default_factory=AWPConfig)


class _Paired(Defense):
    """CE(f(x'), y) + lam * mean ||f(x') - f(x)||^2 (logit pairing)."""

    name = "paired"
    train_branch = "adv"
    label_branch = "adv"
    outer_branches = ("adv", "clean")

    def outer_loss(self, out: StepForwards) -> StepLoss:
        z_adv = out.logits("adv")
        ce = F.cross_entropy(z_adv, out.y)
        pair = (z_adv - out.logits("clean")).pow(2).sum(1).mean()
        return StepLoss(
            logits=z_adv,
            terms={
                "ce_adv": Term(ce, role=LABEL, branch="adv", fn=F.cross_entropy),
                "pairing": Term(pair, weight=float(self.cfg.lam)),
            },
        )


@pytest.fixture
def paired(monkeypatch):
    monkeypatch.setitem(DEFENSES._entries, "paired", Entry("paired", _Paired, _PairedConfig, __name__))


def _node(**extra):
    attack = {"name": "pgd", "steps": 2, "step": EPS / 4, "restarts": 1, "random_start": "uniform",
              "bn_mode": "eval"}  # fmt: skip
    return OmegaConf.create({"name": "paired", "attack": attack, **extra})


def test_a_plugin_defense_builds_and_validates_through_the_registry(paired) -> None:
    defense = build_defense(_node(lam=0.25), ThreatModel("linf", EPS))
    assert isinstance(defense, _Paired) and defense.cfg.lam == 0.25 and defense.attack.steps == 2
    config, problems = check_defense(_node(lamm=1.0))
    assert config is None and problems == ["defense.lamm is not a known key; did you mean `defense.lam`?"]
    _, problems = check_defense(OmegaConf.create({"name": "paired", "attack": None}))
    assert problems == ["defense=paired needs a training attack: defense.attack is null"]
    with pytest.raises(
        ConfigError, match=r"defense.name='pairde' is not a known defense; did you mean `paired`"
    ):
        build_defense({"name": "pairde"}, ThreatModel("linf", EPS))


def test_add_ons_that_need_an_adversarial_batch_accept_a_plugin_defense(paired) -> None:
    assert supported_defenses(RWT)[:3] == ["pgd_at", "trades", "mart"] and "paired" in supported_defenses(RWT)
    run = OmegaConf.create({"defense": _node(), "addons": {"rwt": {}, "sat": {}}})
    assert check_addons(run) == []
    run = OmegaConf.create({"defense": {"name": "standard", "attack": None}, "addons": {"rwt": {}}})
    (problem,) = check_addons(run)
    assert problem.startswith(
        "addons=[rwt] does not compose with defense=standard; supported: pgd_at, trades, mart"
    )


def test_rwt_scales_a_plugin_defenses_label_term(paired) -> None:
    """RWT finds the supervised term by its role: (1 - eta) * CE(x') + lam * pairing + RWT's terms."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)
    torch.manual_seed(0)
    model = build_model("preact_resnet18", 10, (0.5,) * 3, (0.25,) * 3, width=0.0625).double()
    defense = build_defense(_node(), ThreatModel("linf", EPS))
    run = OmegaConf.create({"defense": _node(), "addons": {"rwt": {"eta": 0.3, "noise_std": 0.0}}})
    ctx = {"model": model, "defense": defense, "threat": defense.threat, "num_classes": 10, "seed": 0}
    (rwt,) = build_addons(run, ctx)
    ref = copy.deepcopy(model)
    torch.manual_seed(1)
    metrics = TrainStep(model, defense, torch.optim.SGD(model.parameters(), lr=0.1), [rwt])(x, y)
    torch.manual_seed(1)
    base = TrainStep(
        ref, build_defense(_node(), ThreatModel("linf", EPS)), torch.optim.SGD(ref.parameters(), lr=0.1)
    )
    plain = base(x, y)
    torch.testing.assert_close(metrics["rwt/label_scale"], -0.3 * plain["ce_adv"], rtol=0, atol=1e-12)
    expected = plain["loss"] - 0.3 * plain["ce_adv"] + metrics["rwt/first"] + metrics["rwt/second"]
    torch.testing.assert_close(metrics["loss"], expected, rtol=0, atol=1e-12)
