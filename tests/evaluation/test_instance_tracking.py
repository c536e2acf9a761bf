"""Instance-wise robustness tracking across epochs (docs/methods/iseat.md#analysis): metrics on hand-built
matrices, the
callback inside a tiny training run, resume, and config errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from robust_train.errors import ConfigError
from robust_train.training.callbacks import InstanceTracking, margin_stats, robustness_transitions


def test_robustness_transitions_on_a_hand_built_matrix() -> None:
    # 4 examples over 3 tracked epochs (True = robust).
    robust = np.array(
        [
            [1, 1, 0, 0],  # epoch a
            [1, 0, 1, 0],  # b: #1 lost, #2 gained
            [0, 1, 0, 0],  # c: #0 and #2 lost, #1 gained back
        ],
        dtype=bool,
    )
    t = robustness_transitions(robust)
    assert t["robust_acc"].tolist() == [50.0, 50.0, 25.0]
    assert t["robust_lost_pct"].tolist() == [0.0, 25.0, 50.0]
    assert t["robust_gained_pct"].tolist() == [0.0, 25.0, 25.0]
    # Examples that have lost robustness at least once: {1} after b, {0, 1, 2} after c.
    assert t["ever_lost_pct"].tolist() == [0.0, 25.0, 75.0]
    with pytest.raises(ValueError):
        robustness_transitions(np.zeros(3, dtype=bool))


def test_margin_stats_on_hand_built_margins() -> None:
    mu = np.array([0.5, 1.0, 3.5, 50.0, math.nan])
    budget = np.array([1.0, 1.0, 1.5, 1.0, 1.0])
    s = margin_stats(mu, budget, mu_max=50.0)
    # Of the 4 defined margins: 0.5 and 1.0 flip within the budget; 3.5 >= 2*1.5 and 50 survive 2x;
    # only 50 never flips.
    assert s == {"margin_in_budget_pct": 50.0, "margin_2x_pct": 50.0, "margin_never_pct": 25.0}
    assert all(math.isnan(v) for v in margin_stats(np.array([math.nan]), np.array([1.0]), 50.0).values())


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    conf = Path(__file__).resolve().parents[2] / "robust_train" / "conf"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose("config", overrides=overrides)


TRACK = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval=quick", "eval.n_examples=8",
    "eval.sanity.enabled=false", "dataset.train_limit=96", "trainer.max_batches=2",
    "trainer.validation.max_examples=16", "trainer.instance_tracking.enabled=true",
    "trainer.instance_tracking.n_examples=24", "trainer.instance_tracking.attack.steps=2",
    "trainer.instance_tracking.margin.n_examples=6", "trainer.instance_tracking.margin.mu_max=4",
    "trainer.instance_tracking.margin.grid_step=0.5",
]  # fmt: skip


def test_callback_in_a_tiny_training_run_and_resume(tmp_path: Path) -> None:
    from robust_train.commands.train import train_run

    run_dir = tmp_path / "run"
    res = train_run(_compose([*TRACK, "trainer.epochs=1"]), run_dir)
    with np.load(run_dir / "instance_tracking.npz") as f:
        assert f["epochs"].tolist() == [1]
        assert f["indices"].shape == (24,) and len(set(f["indices"].tolist())) == 24
        for key in ("clean_loss", "adv_loss", "clean_correct", "robust_correct"):
            assert f[key].shape == (1, 24)
        assert f["margin"].shape == (1, 6) and f["margin_budget"].shape == (1, 6)
        # PGD raises the loss of every example it attacks (zero start, CE ascent): AV >= 0 up to noise.
        assert (f["adv_loss"] - f["clean_loss"] >= -1e-4).all()
        robust = f["robust_correct"]
        first = {k: f[k].copy() for k in f.files if k not in ("split", "indices", "epochs")}
    history = res["train"]["history"]
    for rec, row in zip(history, robust, strict=True):
        assert rec["instance/robust_acc"] == pytest.approx(100.0 * row.mean())
        for key in ("av_sd", "av_top10", "av_bottom10", "av_high_pct", "av_low_pct", "clean_acc",
                    "robust_lost_pct", "margin_in_budget_pct", "margin_never_pct"):  # fmt: skip
            assert f"instance/{key}" in rec
    assert history[0]["instance/robust_lost_pct"] == 0.0
    tracked = res["train"]["instance_tracking"]
    assert Path(tracked["plot"]).name == "instance_tracking.png"
    assert Path(tracked["plot"]).read_bytes()[:4] == b"\x89PNG"
    assert res["eval"]["gap"] is not None

    # Resume with one more epoch: the first row is reloaded unchanged, a second is appended.
    res2 = train_run(_compose([*TRACK, "trainer.epochs=2"]), run_dir)
    with np.load(run_dir / "instance_tracking.npz") as f:
        assert f["epochs"].tolist() == [1, 2]
        for k, v in first.items():
            assert f[k].shape[0] == 2 and np.array_equal(f[k][:1], v, equal_nan=True), k
    assert "instance/robust_acc" in res2["train"]["history"][-1]
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["train"]["history"][-1]["epoch"] == 2 and "gap" in saved["eval"]


def test_load_drops_rows_of_epochs_without_a_checkpoint(tmp_path: Path) -> None:
    from robust_train.attacks import ThreatModel
    from robust_train.data import DataBundle

    g = torch.Generator().manual_seed(0)

    def split(n: int):
        return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.randint(
            0, 3, (n,), generator=g
        )

    (tx, ty), (vx, vy), (sx, sy) = split(20), split(10), split(10)
    data = DataBundle("toy", tx, ty, vx, vy, sx, sy, 3, (0.5,) * 3, (0.25,) * 3)
    node = {"every": 1, "split": "val", "n_examples": 6, "batch_size": 4, "margin": {"n_examples": 0}}
    track = InstanceTracking(node, tmp_path, data, ThreatModel("linf", 0.1), seed=0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 3))

    class T:
        epochs = 5

    trainer = T()
    trainer.model = model
    for epoch in (1, 2, 3):
        track.on_epoch_end(trainer, epoch)
    # A restart from the epoch-2 checkpoint: row 3 was measured but its checkpoint never written.
    again = InstanceTracking(node, tmp_path, data, ThreatModel("linf", 0.1), seed=0)
    metrics = again.on_epoch_end(trainer, 3)
    assert again.epochs == [1, 2, 3] and len(again.arrays["robust_correct"]) == 3
    assert "instance/margin_never_pct" not in metrics  # margins disabled
    # The same subset every time; another seed tracks other examples and starts a new record.
    assert torch.equal(again.indices, track.indices)
    other = InstanceTracking(node, tmp_path, data, ThreatModel("linf", 0.1), seed=1)
    with pytest.warns(RuntimeWarning, match="other examples"):
        other.load(before=10)
    assert other.epochs == []


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.instance_tracking.split=test", "trainer.instance_tracking.split"),
        ("trainer.instance_tracking.every=0", "trainer.instance_tracking.every"),
        (
            "trainer.instance_tracking.attack.random_start=gauss",
            "trainer.instance_tracking.attack.random_start",
        ),
        ("trainer.instance_tracking.margin.grid_step=100", "trainer.instance_tracking.margin"),
    ],
)
def test_bad_tracking_config_is_refused(override: str, key: str, tmp_path: Path) -> None:
    from robust_train.commands.train import train_run

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train_run(_compose([*TRACK, override]), tmp_path)
    assert not (tmp_path / "last.pt").exists()
