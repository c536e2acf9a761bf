"""Every experiment preset composes, validates, and runs one training step on tiny synthetic data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robust_train.addons import build_addons
from robust_train.builders import model_from_config, optimizer_from_config, threat_from_config
from robust_train.config import validate_train_config
from robust_train.data import augment_batch, build_dataset
from robust_train.defenses import build_defense
from robust_train.training.step import TrainStep

EXPERIMENTS = sorted(
    str(p.relative_to(Path("robust_train/conf/experiment")).with_suffix(""))
    for p in Path("robust_train/conf/experiment").rglob("*.yaml")
)


def test_presets_exist() -> None:
    assert "demo" in EXPERIMENTS and "base/pgd_at_prn18" in EXPERIMENTS and len(EXPERIMENTS) >= 13


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_preset_composes_and_runs_one_step(compose, name: str) -> None:
    cfg = compose(
        [f"experiment={name}", "dataset=synthetic", "dataset.train_size=48", "dataset.test_size=8",
         "dataset.val_size=8", "model.width=0.0625", "logger=none"]
    )  # fmt: skip
    validate_train_config(cfg)
    if name != "demo":
        assert cfg.paper is not None and cfg.paper.method and "results" in cfg.paper
    torch.manual_seed(0)
    data = build_dataset(cfg.dataset, 0)
    model = model_from_config(cfg.model, data)
    threat = threat_from_config(cfg.threat)
    defense = build_defense(cfg.defense, threat)
    addons = build_addons(
        cfg, {"model": model, "defense": defense, "threat": threat, "num_classes": 10, "seed": 0}
    )
    # An epoch where every warm-up is over and every scheduled strength is on.
    epoch = int(cfg.trainer.epochs) - 1
    defense.on_epoch_start(epoch)
    for addon in addons:
        addon.on_epoch_start(epoch)
    opt = optimizer_from_config(cfg.trainer.optimizer, model, torch.device("cpu"))
    step = TrainStep(model, defense, opt, addons)
    x = augment_batch(data.train_x[:8], pad=int(cfg.dataset.crop_pad), padding_mode=cfg.dataset.padding_mode)
    before = [p.detach().clone() for p in model.parameters()]
    metrics = step(x, data.train_y[:8])
    assert torch.isfinite(metrics["loss"])
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
