"""The state-of-the-art presets `experiment=sota/...` (Wang et al. 2023, DM-Improves-AT train-wa.py).

They must carry the recipe as the authors' code runs it, refuse to start without the generated images,
and train (tiny, on the CPU) once `dataset.extra` points at a file in the authors' .npz format.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from robust_train.commands.train import train_run
from robust_train.config import validate_train_config
from robust_train.errors import RobustTrainError

PRESETS = {
    # name: (images, batch, epochs, warm-up epochs, paper clean, paper AutoAttack)
    "sota/dm_wrn28_10_1m": ("1M", 512, 400, 10, 91.12, 63.35),
    "sota/dm_wrn28_10_20m": ("20M", 1024, 2000, 50, 92.44, 67.31),
}
TINY = [
    "dataset=synthetic", "debug=fast", "logger=none", "model.width=0.0625", "trainer.progress=false",
    "trainer.epochs=1", "trainer.batch_size=16", "trainer.max_batches=2", "trainer.validation.pgd_steps=1",
    "trainer.validation.max_examples=16", "defense.attack.steps=1", "eval=quick", "eval.n_examples=8",
    "eval.sanity.enabled=false",
]  # fmt: skip


def write_dm_npz(path: Path, n: int, seed: int = 0) -> Path:
    """The DM-Improves-AT format: np.savez with uint8 `image` N x 32 x 32 x 3 and integer `label` N."""
    rng = np.random.default_rng(seed)
    np.savez(path, image=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), label=rng.integers(0, 10, n))
    return path


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_carries_the_train_wa_recipe(compose, name: str) -> None:
    _, batch, epochs, warmup, clean, aa = PRESETS[name]
    cfg = compose([f"experiment={name}", "logger=none"])
    assert cfg.dataset.name == "cifar10" and cfg.model.name == "wrn28_10_silu"
    assert (cfg.model.normalize, cfg.model.stats, cfg.model.bn_momentum) == ("meanstd", "cifar10", 0.01)
    assert (cfg.threat.norm, cfg.threat.eps, cfg.threat.step) == ("linf", "8/255", "2/255")
    assert cfg.defense.name == "trades" and cfg.defense.beta == 5.0 and cfg.defense.label_smoothing == 0.1
    assert not cfg.defense.awp.enabled
    assert (cfg.defense.attack.steps, cfg.defense.attack.random_start) == (10, "uniform")
    assert cfg.dataset.extra_fraction == 0.7 and cfg.dataset.val_size == 1024
    # An epoch as DM-AT counts it: ceil(50,000 CIFAR-10 training images / batch).
    assert cfg.dataset.epoch_steps == math.ceil(50_000 / batch)
    t = cfg.trainer
    assert (t.epochs, t.batch_size) == (epochs, batch)
    assert OmegaConf.to_container(t.optimizer) == {
        "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4
    }  # fmt: skip
    assert t.schedule.name == "cosine" and t.schedule.warmup_epochs == warmup == 0.025 * epochs
    assert OmegaConf.to_container(cfg.ema) == {
        "enabled": True, "decay": 0.995, "warmup": True, "start": 0.025, "buffers": "copy", "evaluate": True
    }  # fmt: skip
    assert cfg.eval.name == "full" and "autoattack" in cfg.eval.attacks
    assert cfg.paper.verified is False and "Wang et al. 2023" in cfg.paper.method and cfg.paper.source
    assert OmegaConf.to_container(cfg.paper.results) == {"best": {"clean": clean, "autoattack": aa}}
    # The generated images are the user's: the preset leaves the path to them unset.
    assert OmegaConf.to_container(cfg.dataset.extra) == ["???"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_refuses_to_train_without_the_generated_images(compose, tmp_path, name: str) -> None:
    cfg = compose([f"experiment={name}", *TINY])
    validate_train_config(cfg)  # composes and validates (tests/training/test_experiments.py runs a step)
    with pytest.raises(
        RobustTrainError, match=r"^dataset\.extra is required by this preset: set dataset\.extra="
    ) as info:
        train_run(cfg, tmp_path / "run")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_preset_trains_with_an_npz_in_the_authors_format(compose, tmp_path) -> None:
    npz = write_dm_npz(tmp_path / "1m.npz", 256)
    cfg = compose(["experiment=sota/dm_wrn28_10_1m", *TINY, f"dataset.extra={npz}"])
    results = train_run(cfg, tmp_path / "run")
    assert results["config"]["dataset"]["extra"] == str(npz)
    assert {"best", "last", "ema"} <= set(results["eval"])
    assert results["config"]["defense"]["label_smoothing"] == 0.1
