"""Loss formulas of the base defenses (docs/methods/trades.md#loss, docs/methods/mart.md#loss), as plain
functions: the defenses build their terms from them, add-ons re-evaluate a term on other logits with
them, and tests check them directly."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_clean_adv(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """Per-example KL(p_clean || p_adv), summed over classes (TRADES' inner and outer term)."""
    log_p_adv = F.log_softmax(logits_adv, dim=1)
    p_clean = F.softmax(logits_clean, dim=1)
    return F.kl_div(log_p_adv, p_clean, reduction="none").sum(dim=1)


def trades_loss(
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE(f(x), y) + beta * KL(p(x) || p(x')) with batchmean reduction; returns (loss, ce, kl).

    The clean target is not detached: gradients flow through both branches (docs/methods/trades.md#loss).
    """
    ce = F.cross_entropy(logits_clean, y)
    kl = kl_clean_adv(logits_adv, logits_clean).mean()
    return ce + beta * kl, ce, kl


def mart_boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
    """MART's boosted CE on x': CE(f(x'), y) - log(1.0001 - max_{k != y} q_k(x') + 1e-12), batch mean.

    `q` is softmax(logits_adv) when the caller already has it (one softmax shared with the KL term, as in
    the reference; docs/methods/mart.md#loss).
    """
    if q is None:
        q = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(q, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    q_wrong = q.gather(1, wrong.unsqueeze(1)).squeeze(1)
    return F.cross_entropy(logits_adv, y) + (-torch.log(1.0001 - q_wrong + 1e-12)).mean()


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
    logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MART's boosted CE on x' plus beta * the (1 - p_y(x))-weighted KL(p(x) || q(x')); (loss, bce, kl).

    The numerical guards 1.0001, 1e-12 and 1.0000001 are the reference's (docs/methods/mart.md#loss).
    """
    q = F.softmax(logits_adv, dim=1)
    bce = mart_boosted_ce(logits_adv, y, q)
    kl = mart_weighted_kl(logits_clean, logits_adv, y, q)
    return bce + beta * kl, bce, kl
