"""Loss formulas of the base defenses (docs/methods/trades.md#loss, docs/methods/mart.md#loss), as plain
functions: the defenses build their terms from them, add-ons re-evaluate a term on other logits with
them, and tests check them directly. `label_smoothing` (every base defense's `defense.label_smoothing`)
smooths the labels of the supervised CE and nothing else."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from robust_train.step_types import TermFn


def smoothed_cross_entropy(label_smoothing: float = 0.0) -> TermFn:
    """CE against labels smoothed by `label_smoothing` (`defense.label_smoothing`), batch mean.

    Target 1 - ls + ls/K on the true class and ls/K on each other: PyTorch's `label_smoothing`, equal to
    DM-Improves-AT's SmoothCrossEntropyLoss ((1 - ls) * NLL + ls * mean over classes of -log p). At 0
    this is `F.cross_entropy` itself, so runs without smoothing compute exactly what they did before.
    """
    if label_smoothing == 0:
        return F.cross_entropy
    return partial(F.cross_entropy, label_smoothing=float(label_smoothing))


def kl_clean_adv(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p_clean || p_adv), summed over classes (TRADES' inner and outer term)."""
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    p_clean = F.softmax(logits_clean, dim=1)
    return F.kl_div(log_p_adv, p_clean, reduction="none").sum(dim=1)


def trades_loss(
    logits_clean: torch.Tensor,
    logits_adv: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE(f(x), y) + beta * KL(p(x) || p(x')) with batchmean reduction; returns (loss, ce, kl).

    The clean target is not detached: gradients flow through both branches (docs/methods/trades.md#loss).
    `label_smoothing` smooths the labels of the CE term only (DM-Improves-AT's `--ls`); the KL term's
    target stays p(x).
    """
    ce = smoothed_cross_entropy(label_smoothing)(logits_clean, y)
    kl = kl_clean_adv(logits_adv, logits_clean).mean()
    return ce + beta * kl, ce, kl


def mart_boosted_ce(
    logits_adv: torch.Tensor,
    y: torch.Tensor,
    q: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """MART's boosted CE on x': CE(f(x'), y) - log(1.0001 - max_{k != y} q_k(x') + 1e-12), batch mean.

    `q` is softmax(logits_adv) when the caller already has it (one softmax shared with the KL term, as in
    the reference; docs/methods/mart.md#loss). `label_smoothing` smooths the labels of the CE part; the
    margin part (the largest wrong-class probability) is left as it is.
    """
    if q is None:
        q = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(q, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    q_wrong = q.gather(1, wrong.unsqueeze(1)).squeeze(1)
    ce = smoothed_cross_entropy(label_smoothing)(logits_adv, y)
    return ce + (-torch.log(1.0001 - q_wrong + 1e-12)).mean()


def mart_weighted_kl(
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, q: torch.Tensor | None = None
) -> torch.Tensor:
    """MART's (1 - p_y(x))-weighted KL(p(x) || q(x')), batch mean; `q` as in `mart_boosted_ce`."""
    if q is None:
        q = F.softmax(logits_adv, dim=1)
    p = F.softmax(logits_clean, dim=1)
    kl_per = F.kl_div(torch.log(q + 1e-12), p, reduction="none").sum(dim=1)
    p_true = p.gather(1, y.unsqueeze(1)).squeeze(1)
    return (kl_per * (1.0000001 - p_true)).mean()


def mart_loss(
    logits_clean: torch.Tensor,
    logits_adv: torch.Tensor,
    y: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MART's boosted CE on x' plus beta * the (1 - p_y(x))-weighted KL(p(x) || q(x')); (loss, bce, kl).

    The numerical guards 1.0001, 1e-12 and 1.0000001 are the reference's (docs/methods/mart.md#loss).
    """
    q = F.softmax(logits_adv, dim=1)
    bce = mart_boosted_ce(logits_adv, y, q, label_smoothing)
    kl = mart_weighted_kl(logits_clean, logits_adv, y, q)
    return bce + beta * kl, bce, kl
