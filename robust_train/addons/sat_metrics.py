"""SAT's analysis metric: clustering accuracy (Clu.Acc, docs/methods/sat.md#clustering-accuracy; seed Def. 1,
Eq. 2).

Per class c and tapped layer l the centroid is the mean flattened feature of the clean *training* images
of c (eval mode); a test image's cluster label is the class of the nearest centroid in L2 (argmin: the
seed's argmax is a typo), and Clu.Acc^l is the fraction of test images whose cluster label is the true one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.attacks import attack_mode
from robust_train.models.features import forward_with_features


def class_centroids(feats: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, d) mean of the flattened features of each class; rows of absent classes are NaN."""
    f = feats.flatten(1).double()
    onehot = F.one_hot(y, num_classes).double()
    counts = onehot.sum(0).unsqueeze(1)
    sums = onehot.t() @ f
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


def nearest_centroid(feats: torch.Tensor, centroids: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Cluster label of each row: the class of the nearest centroid in L_p, L2 by default (absent classes
    never win); p = inf is the norm of Jin et al.'s code."""
    dist = torch.cdist(feats.flatten(1).double(), torch.nan_to_num(centroids, nan=0.0), p=p)
    dist = dist.masked_fill(torch.isnan(centroids).any(dim=1).unsqueeze(0), float("inf"))
    return dist.argmin(dim=1)


def clustering_accuracy(feats: torch.Tensor, y: torch.Tensor, centroids: torch.Tensor) -> float:
    """Fraction of rows whose nearest-centroid label equals y."""
    return float((nearest_centroid(feats, centroids) == y).double().mean())


@torch.no_grad()
def _features(
    model: nn.Module, x: torch.Tensor, layers: Sequence[str], batch_size: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    preds = []
    for i in range(0, x.shape[0], batch_size):
        logits, feats = forward_with_features(model, x[i : i + batch_size], layers, detach=True)
        preds.append(logits.argmax(1))
        for n in layers:
            chunks[n].append(feats[n].flatten(1).double())
    return {n: torch.cat(c) for n, c in chunks.items()}, torch.cat(preds)


def clustering_accuracy_report(
    model: nn.Module,
    layers: Sequence[str],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    attack: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
) -> dict[str, float]:
    """Clu.Acc per layer and the classifier's accuracy on the test images (adversarial with `attack`).

    Centroids come from the clean training images only; the model runs in eval mode and its modes are
    restored afterwards. `attack(model, x, y)` crafts test perturbations against the classifier output.
    """
    with attack_mode(model, "eval"):
        train_feats, _ = _features(model, train[0], layers, batch_size)
        centroids = {n: class_centroids(train_feats[n], train[1], num_classes) for n in layers}
    x, y = test
    if attack is not None:
        x = torch.cat(
            [
                attack(model, x[i : i + batch_size], y[i : i + batch_size])
                for i in range(0, len(x), batch_size)
            ]
        )
    with attack_mode(model, "eval"):
        test_feats, preds = _features(model, x, layers, batch_size)
    report = {n: clustering_accuracy(test_feats[n], y, centroids[n]) for n in layers}
    report["classifier"] = float((preds == y).double().mean())
    return report
