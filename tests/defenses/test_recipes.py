"""The composed configs of TRADES and MART keep the official attack start, and the base recipes drop the
learning rate at their reference codes' epochs (docs/methods/trades.md#training-attack,
docs/methods/trades.md#recipes, docs/methods/mart.md#training-attack, docs/methods/mart.md#recipes,
docs/methods/awp.md#recipes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from robust_train.builders import threat_from_config
from robust_train.defenses import build_defense
from robust_train.training.schedule import lr_at

CONF = Path(__file__).resolve().parents[2] / "robust_train" / "conf"
TRADES_LIKE = ("trades", "mart", "trades_awp", "mart_awp")
# Every preset whose base defense is TRADES or MART (any variant), found from its defaults list.
TRADES_LIKE_PRESETS = sorted(
    str(p.relative_to(CONF / "experiment").with_suffix(""))
    for p in (CONF / "experiment").rglob("*.yaml")
    if re.search(r"override /defense: (trades|mart)\b", p.read_text())
)


def _attack_of(cfg):
    defense = build_defense(cfg.defense, threat_from_config(cfg.threat))
    return defense.attack


@pytest.mark.parametrize("name", TRADES_LIKE)
def test_default_trades_and_mart_configs_start_from_normal(compose, name: str) -> None:
    cfg = compose([f"defense={name}"])
    assert cfg.defense.attack.random_start == "normal"
    attack = _attack_of(cfg)
    assert attack.random_start == "normal" and attack.bn_mode == "eval" and attack.steps == 10


@pytest.mark.parametrize("name,start", [("trades", "normal"), ("mart", "normal"), ("pgd_at", "uniform")])
def test_a_hand_written_attack_node_gets_the_methods_own_start(compose, name: str, start: str) -> None:
    """`defense.attack={name: pgd, ...}` without random_start must not turn TRADES' start uniform."""
    cfg = compose([f"defense={name}", "~defense.attack.random_start"])
    assert "random_start" not in cfg.defense.attack
    assert _attack_of(cfg).random_start == start


def test_trades_like_presets_found() -> None:
    assert len(TRADES_LIKE_PRESETS) >= 20 and "base/trades_wrn34" in TRADES_LIKE_PRESETS


# Presets that follow another code's TRADES attack: DM-Improves-AT's gowal21uncovering/utils/trades.py starts
# from x + U(-eps, eps) (Wang et al. 2023).
OTHER_STARTS = {"sota/dm_wrn28_10_1m": "uniform", "sota/dm_wrn28_10_20m": "uniform"}


@pytest.mark.parametrize("name", TRADES_LIKE_PRESETS)
def test_trades_and_mart_presets_start_from_normal(compose, name: str) -> None:
    cfg = compose([f"experiment={name}"])
    assert cfg.defense.name in ("trades", "mart")
    assert _attack_of(cfg).random_start == OTHER_STARTS.get(name, "normal")


def _drops(cfg, n_batches: int = 10) -> list[tuple[int, int]]:
    """(0-indexed epoch, batch) of every step whose lr is lower than the step before it."""
    t = cfg.trainer
    steps = [(e, b) for e in range(int(t.epochs)) for b in range(n_batches)]
    lrs = [lr_at(t.schedule, float(t.optimizer.lr), int(t.epochs), e, b, n_batches) for e, b in steps]
    return [steps[i] for i in range(1, len(steps)) if lrs[i] < lrs[i - 1]]


# Reference drops as (0-indexed epoch, batch of 10). The official scripts count epochs from 1 and set the lr
# at the start of epoch e when e >= m, i.e. from 0-indexed epoch m - 1; robust_overfitting (and AT-AWP)
# evaluate lr(epoch + (i + 1) / n) every iteration, so the drop lands on the last batch of epoch 99 / 149.
BASE_DROPS = {
    "base/trades_wrn34": [(74, 0)],  # train_trades_cifar10.py: x0.1 from epoch 75 (of 76)
    "base/mart_wrn34": [(74, 0), (89, 0)],  # MART train_wideresnet.py: 75, 90 (100 is past the 90 epochs)
    "base/mart_resnet18_official": [(74, 0), (89, 0), (99, 0)],  # MART train_resnet.py: 75, 90, 100
    "base/trades_awp_wrn34": [(99, 0), (149, 0)],  # AWP trades_AWP/train_trades_cifar.py: >= 100, >= 150
    "base/trades_awp_prn18": [(99, 0), (149, 0)],
    "base/mart_awp_wrn34": [(99, 0), (149, 0)],  # by analogy with TRADES-AWP (docs/methods/awp.md#mart-awp)
    "base/pgd_at_prn18": [(99, 9), (149, 9)],  # robust_overfitting train_cifar.py, per iteration
    "base/pgd_at_wrn34": [(99, 9), (149, 9)],
    "base/awp_prn18": [(99, 9), (149, 9)],  # AT_AWP/train_cifar10.py, the same rule
    "base/awp_wrn34": [(99, 9), (149, 9)],
}


@pytest.mark.parametrize("name", sorted(BASE_DROPS))
def test_base_presets_drop_the_lr_at_the_reference_epochs(compose, name: str) -> None:
    assert _drops(compose([f"experiment={name}"])) == BASE_DROPS[name]
