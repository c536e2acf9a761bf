"""Training loss of PGD-AT steps with AWP at several strengths, from the same initialization.

Shows whether weight perturbation from the very first step stalls a small model:

    python scripts/awp_probe.py --gammas 0 1e-4 0.01 --steps 60
"""

from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_dir

from robust_train.builders import model_from_config, optimizer_from_config, threat_from_config
from robust_train.cli import CONFIG_DIR
from robust_train.data import augment_batch, batch_indices, build_dataset
from robust_train.defenses import build_defense
from robust_train.training.step import TrainStep


def losses(gamma: float, steps: int, attack_steps: int) -> list[float]:
    """Per-step training loss of AT-AWP with strength gamma on the demo setup (mnist5k, width 0.125)."""
    overrides = ["experiment=demo", "defense=awp", f"defense.awp.gamma={gamma}", "logger=none",
                 f"defense.attack.steps={attack_steps}", "defense.attack.step=0.05"]  # fmt: skip
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    torch.manual_seed(0)
    data = build_dataset(cfg.dataset, 0)
    model = model_from_config(cfg.model, data)
    defense = build_defense(cfg.defense, threat_from_config(cfg.threat))
    defense.on_epoch_start(0)
    step = TrainStep(model, defense, optimizer_from_config(cfg.trainer.optimizer, model, torch.device("cpu")))
    gen = torch.Generator().manual_seed(1)
    out = []
    for idx in batch_indices(data.train_x.shape[0], 64, True, gen)[:steps]:
        metrics = step(augment_batch(data.train_x[idx], generator=gen, flip=False), data.train_y[idx])
        out.append(float(metrics["loss"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 1e-4, 0.01])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--attack-steps", type=int, default=3)
    args = parser.parse_args()
    for gamma in args.gammas:
        trace = losses(gamma, args.steps, args.attack_steps)
        every = max(1, args.steps // 10)
        print(f"gamma {gamma:<8g} loss every {every} steps: " + " ".join(f"{v:.3f}" for v in trace[::every]))


if __name__ == "__main__":
    main()
