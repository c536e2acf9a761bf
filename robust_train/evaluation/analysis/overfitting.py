"""`robust_overfitting`: the suite on the sibling checkpoint (best <-> last) and the best-minus-last gap."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from robust_train.evaluation.evaluate import EvalSetup, evaluate_model
from robust_train.models import check_state_dict_compatible
from robust_train.tracking.checkpoint import load_checkpoint
from robust_train.training.ema import checkpoint_weights, with_weights


def suite_gap(evaluation: Mapping[str, Any]) -> dict[str, float] | None:
    """Best minus last accuracy (points) for every attack both checkpoints were evaluated with; None
    unless both exist. A positive gap is robust overfitting: the final model lost what the best had."""
    best, last = evaluation.get("best"), evaluation.get("last")
    if not isinstance(best, Mapping) or not isinstance(last, Mapping):
        return None
    # An entry that duplicates the other checkpoint (same epoch) has a zero gap.
    b = best.get("attacks") or (last.get("attacks") if best.get("same_as") == "last" else None) or {}
    a = last.get("attacks") or (best.get("attacks") if last.get("same_as") == "best" else None) or {}
    return {name: float(b[name]["accuracy"]) - float(a[name]["accuracy"]) for name in b if name in a}


def format_gap(gap: Mapping[str, float] | None) -> str:
    """One console line; empty when there is no gap to show."""
    if not gap:
        return ""
    return "robust overfitting (best - last, points): " + ", ".join(f"{k} {v:+.2f}" for k, v in gap.items())


def sibling_checkpoint(checkpoint: str | Path) -> tuple[str, Path] | None:
    """('last', .../last.pt) for a best.pt and vice versa, when that file exists."""
    path = Path(str(checkpoint))
    other = {"best": "last", "last": "best"}.get(path.stem)
    if other is None or not (path.parent / f"{other}.pt").is_file():
        return None
    return other, path.parent / f"{other}.pt"


def evaluate_sibling(
    setup: EvalSetup,
    model: nn.Module,
    checkpoint: str | Path,
    own_epoch: int,
    own_weights: str | None = "trained",
) -> tuple[str, dict[str, Any]] | None:
    """The suite on the sibling of `checkpoint` (best <-> last) for the robust-overfitting gap.

    Loads the sibling's weights into `model` (the plain network; the setup's add-ons wrap it) and
    returns (kind, entry shaped like results['eval'][kind]), or None when there is no sibling. A sibling
    saved at the same epoch holds the same weights and is not evaluated again. The sibling is only
    there for the gap, so the sanity checks (budgeted for the evaluated checkpoint) do not run on it.
    The sibling is evaluated with its own default weights (best.pt of an EMA run: the averaged ones),
    so it counts as the same only at the same epoch with the same weights (`own_weights`).
    """
    found = sibling_checkpoint(checkpoint)
    if found is None:
        return None
    kind, path = found
    state = load_checkpoint(path, map_location=setup.x.device)
    epoch = int(state.get("epoch", -1))
    weights, which = checkpoint_weights(state, where=path)
    if epoch == own_epoch and which == (own_weights or "trained"):
        same = {"epoch": epoch, "checkpoint": str(path), "same_as": Path(str(checkpoint)).stem}
        return kind, with_weights(same, which)
    check_state_dict_compatible(model, weights, str(path))
    model.load_state_dict(weights)
    return kind, with_weights(evaluate_model(setup, model, kind, epoch, path, checks=False), which)
