"""The one evaluation of a model: the end-of-training evaluation (commands/train.py), `robust-eval`
(commands/evaluate.py) and the robust-overfitting sibling (evaluation/analysis/overfitting.py) all call
`evaluate_model` and log with `log_evaluation`.

An `EvalSetup` holds what stays fixed across the checkpoints of one evaluation (the suite's attacks,
the test examples, the sanity settings, the add-ons whose eval-time wrappers apply, the tracker);
`evaluate_model` turns one set of weights into the per-checkpoint entry of results.json:
{epoch, checkpoint, attacks, sanity}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust_train.attacks import Attack, ThreatModel
from robust_train.data import DataBundle
from robust_train.evaluation.sanity import run_sanity_checks, sanity_settings
from robust_train.evaluation.sanity import summary_values as sanity_summary
from robust_train.evaluation.suite import build_suite, run_suite
from robust_train.tracking.wandb_run import Tracker


@dataclass
class EvalSetup:
    """The suite, the test examples and the settings one evaluation applies to every checkpoint."""

    attacks: dict[str, Attack]
    x: torch.Tensor  # uint8 test images on the model's device
    y: torch.Tensor
    batch_size: int
    threat: ThreatModel
    seed: int
    suite: str | None = None  # eval.name, reported in results.json
    sanity: Mapping[str, Any] | None = None  # the eval.sanity node
    addons: Sequence[Any] = ()  # add-ons whose `wrap_for_eval` applies to every evaluated model
    state_dir: Path | None = None  # where long attacks keep resumable state
    progress: bool = True
    tracker: Tracker = field(default_factory=Tracker)

    @classmethod
    def from_config(
        cls,
        eval_cfg: Mapping[str, Any],
        threat: ThreatModel,
        data: DataBundle,
        seed: int,
        addons: Sequence[Any] = (),
        state_dir: Path | None = None,
        progress: bool = True,
        tracker: Tracker | None = None,
    ) -> EvalSetup:
        """The `eval` node's suite on its first `n_examples` test images (all when unset)."""
        attacks = build_suite(eval_cfg, threat)
        n = eval_cfg.get("n_examples")
        x, y = data.test_x, data.test_y
        if n:
            x, y = x[: int(n)], y[: int(n)]
        return cls(
            attacks, x, y, int(eval_cfg["batch_size"]), threat, int(seed), eval_cfg.get("name"),
            eval_cfg.get("sanity"), tuple(addons), state_dir, progress, tracker or Tracker(),
        )  # fmt: skip

    def header(self) -> dict[str, Any]:
        """The suite-wide keys of results.json's `eval` node; checkpoint entries follow them."""
        return {"suite": self.suite, "n_examples": int(self.x.shape[0])}

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as the add-ons evaluate it (e.g. LAD's noisy ensemble); fresh for every call."""
        for addon in self.addons:
            model = addon.wrap_for_eval(model)
        return model


def evaluate_model(
    setup: EvalSetup,
    model: nn.Module,
    kind: str,
    epoch: int,
    checkpoint: str | Path,
    checks: bool = True,
    examples: bool = False,
) -> dict[str, Any]:
    """The suite (and, with `checks`, the sanity checks) on `model` wrapped by the add-ons.

    `model` is the plain network holding the weights of `checkpoint`; `kind` (best, last) labels the
    progress bars, the attack state files and the W&B keys. Returns {epoch, checkpoint, attacks,
    sanity (when enabled)}; the sanity flags go to the W&B summary, and with `examples` a table of
    example images is logged for this checkpoint.
    """
    wrapped = setup.wrap(model)
    entry: dict[str, Any] = {
        "epoch": int(epoch),
        "checkpoint": str(checkpoint),
        "attacks": run_suite(
            wrapped, setup.attacks, setup.x, setup.y, setup.batch_size, setup.progress, kind,
            state_dir=setup.state_dir,
        ),
    }  # fmt: skip
    if checks and sanity_settings(setup.sanity)["enabled"]:
        # Budgeted checks for gradient masking and weak attacks (flags in results.json and W&B).
        entry["sanity"] = run_sanity_checks(
            wrapped, setup.x, setup.y, setup.threat, setup.sanity, entry["attacks"], setup.seed
        )
        setup.tracker.summary(sanity_summary(kind, entry["sanity"]))
    if examples:  # W&B table of example images (logger.example_images)
        setup.tracker.log_examples("eval/examples", wrapped, setup.attacks, setup.x, setup.y, kind)
    return entry


def log_evaluation(tracker: Tracker, evaluation: Mapping[str, Any]) -> None:
    """results.json's `eval` node to W&B: the per-attack table and the summary values robust-report reads
    (eval/<checkpoint>/<attack> and its time_s, eval_epoch/<checkpoint>, eval/n_examples, eval/gap/*,
    and eval_weights/<checkpoint>: trained or ema, for entries that say which weights they evaluated)."""
    rows = [
        [kind, entry["epoch"], name, a["accuracy"], a["n"], a["time_s"]]
        for kind, entry in evaluation.items()
        if isinstance(entry, Mapping) and "attacks" in entry
        for name, a in entry["attacks"].items()
    ]
    tracker.log_table("eval/results", ["checkpoint", "epoch", "attack", "accuracy", "n", "time_s"], rows)
    tracker.summary(
        {f"eval/{row[0]}/{row[2]}": row[3] for row in rows}
        | {f"eval/{row[0]}/{row[2]}/time_s": row[5] for row in rows}  # per-attack evaluation time
        | {f"eval_epoch/{row[0]}": row[1] for row in rows}
        | {"eval/n_examples": evaluation.get("n_examples")}
        | {f"eval/gap/{k}": v for k, v in (evaluation.get("gap") or {}).items()}
        | {
            f"eval_weights/{kind}": entry["weights"]
            for kind, entry in evaluation.items()
            if isinstance(entry, Mapping) and "attacks" in entry and entry.get("weights")
        }
    )
