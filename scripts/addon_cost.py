"""Cost of one training step per defense/add-on combination, relative to the base defense alone.

Counts the model's forward and backward passes in one step (hooks on the model) and times steps on
synthetic CIFAR-shaped data. Example (CPU):

    python scripts/addon_cost.py --width 0.25 --batch 64 --steps 3 --defense pgd_at trades \
        --addons slim sat lad iseat rwt
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from robust_train.addons import build_addons
from robust_train.builders import model_from_config, optimizer_from_config, threat_from_config
from robust_train.cli import CONFIG_DIR
from robust_train.data import augment_batch, build_dataset
from robust_train.defenses import build_defense
from robust_train.training.step import TrainStep

SYNTHETIC = ["dataset=synthetic", "dataset.train_size=512", "dataset.test_size=8", "dataset.val_size=8"]


def make_step(overrides: list[str], width: float) -> tuple[TrainStep, Any, torch.Tensor, torch.Tensor]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[*SYNTHETIC, f"model.width={width}", "logger=none", *overrides],
        )  # fmt: skip
    torch.manual_seed(0)
    data = build_dataset(cfg.dataset, 0)
    model = model_from_config(cfg.model, data)
    threat = threat_from_config(cfg.threat)
    defense = build_defense(cfg.defense, threat)
    ctx = {"model": model, "defense": defense, "threat": threat, "num_classes": 10, "seed": 0}
    addons = build_addons(cfg, ctx)
    epoch = int(cfg.trainer.epochs) - 1  # every warm-up over, every scheduled strength on
    defense.on_epoch_start(epoch)
    for addon in addons:
        addon.on_epoch_start(epoch)
    step = TrainStep(
        model, defense, optimizer_from_config(cfg.trainer.optimizer, model, torch.device("cpu")), addons
    )
    return step, model, data.train_x, data.train_y


def measure(overrides: list[str], width: float, batch: int, steps: int) -> dict[str, float]:
    step, model, xs, ys = make_step(overrides, width)
    counts = {"fwd": 0, "bwd": 0}
    root_modules = [model]

    def on_forward(module, inputs, output):
        counts["fwd"] += 1

    def on_backward(module, grad_in, grad_out):
        counts["bwd"] += 1

    handles = [m.register_forward_hook(on_forward) for m in root_modules]
    # The stem conv's backward runs once per backward pass through the whole network.
    stem = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    handles.append(stem.register_full_backward_hook(on_backward))
    x = augment_batch(xs[:batch])
    y = ys[:batch]
    step(x, y)  # warm-up, and the pass count of one step
    passes = dict(counts)
    for h in handles:
        h.remove()
    start = time.perf_counter()
    for i in range(steps):
        step(augment_batch(xs[(i + 1) * batch : (i + 2) * batch]), ys[(i + 1) * batch : (i + 2) * batch])
    seconds = (time.perf_counter() - start) / steps
    return {"forwards": passes["fwd"], "backwards": passes["bwd"], "s_per_step": seconds}


def main() -> None:
    # The stem's full backward hook also fires for input-only gradients (attack steps): that is the count.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--defense", nargs="+", default=["pgd_at"])
    parser.add_argument("--addons", nargs="+", default=["slim", "sat", "lad", "iseat", "rwt"])
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides for every run")
    args = parser.parse_args()
    print(f"PreActResNet-18 width {args.width}, batch {args.batch}, CPU threads {torch.get_num_threads()}")
    print(f"{'defense':<10} {'add-on':<8} {'fwd':>4} {'bwd':>4} {'s/step':>8} {'x base':>7}")

    def row(defense: str, addon: str, r: dict[str, float], ratio: float) -> None:
        cells = f"{r['forwards']:>4} {r['backwards']:>4} {r['s_per_step']:>8.3f} {ratio:>7.2f}"
        print(f"{defense:<10} {addon:<8} {cells}", flush=True)

    measure(["defense=pgd_at", *args.extra], args.width, args.batch, 1)  # process warm-up, discarded
    for defense in args.defense:
        base = measure([f"defense={defense}", *args.extra], args.width, args.batch, args.steps)
        row(defense, "-", base, 1.0)
        for addon in args.addons:
            overrides = [f"defense={defense}", f"addons=[{addon}]", *args.extra]
            r = measure(overrides, args.width, args.batch, args.steps)
            row(defense, addon, r, r["s_per_step"] / base["s_per_step"])


if __name__ == "__main__":
    main()
