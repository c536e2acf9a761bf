"""Clustering-effect accuracy (Clu.Acc): the one implementation behind SAT's metric
(robust_train.addons.sat_metrics, docs/methods/sat.md#clustering-accuracy) and the layer-wise analysis
(robust_train.evaluation.analysis, `analysis=[clustering]`).

Per class c and layer l the centroid is the mean flattened feature of the clean *training* images of c
(eval mode, optionally only the correctly classified ones); an input's cluster label is the class of
the nearest centroid (argmin; L2 by default), and Clu.Acc^l is the fraction of inputs whose cluster label
is their true class.

It sits below addons/ and evaluation/ (it imports only attacks.base, models and data), so both import it
without an upward import.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from robust_train.attacks.base import attack_mode
from robust_train.data.augment import to_float
from robust_train.models.features import capture_features


def float_batches(x: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, batch) over x; uint8 images become float [0, 1] one batch at a time, other dtypes pass."""
    for i in range(0, x.shape[0], max(1, batch_size)):
        chunk = x[i : i + batch_size]
        yield i, to_float(chunk) if chunk.dtype == torch.uint8 else chunk


class CentroidAccumulator:
    """Per-class running sums of flattened features, so centroids of a whole training set never need
    all its features in memory at once (a CIFAR ResNet's layer1 is 65,536 values per image)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        f = feats.flatten(1).double()
        onehot = F.one_hot(y, self.num_classes).double()
        sums, counts = onehot.t() @ f, onehot.sum(0)
        self.sums = sums if self.sums is None else self.sums + sums
        self.counts = counts if self.counts is None else self.counts + counts

    def centroids(self) -> torch.Tensor:
        """(C, d) class means; rows of classes never seen are NaN (they never win the argmin)."""
        if self.sums is None or self.counts is None:
            raise ValueError("no features were added")
        c = self.counts.unsqueeze(1)
        return torch.where(c > 0, self.sums / c.clamp(min=1), torch.full_like(self.sums, float("nan")))


def class_centroids(feats: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, d) mean of the flattened features of each class in one pass; rows of absent classes are NaN."""
    acc = CentroidAccumulator(num_classes)
    acc.add(feats, y)
    return acc.centroids()


def nearest_centroid(feats: torch.Tensor, centroids: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Cluster label of each row: the class of the nearest centroid in L_p, L2 by default (absent classes
    never win); p = inf is the norm of Jin et al.'s code."""
    dist = torch.cdist(feats.flatten(1).double(), torch.nan_to_num(centroids, nan=0.0), p=p)
    dist = dist.masked_fill(torch.isnan(centroids).any(dim=1).unsqueeze(0), float("inf"))
    return dist.argmin(dim=1)


def clustering_accuracy(
    feats: torch.Tensor, y: torch.Tensor, centroids: torch.Tensor, p: float = 2.0
) -> float:
    """Fraction of rows whose nearest-centroid label equals y."""
    return float((nearest_centroid(feats, centroids, p) == y).double().mean())


@torch.no_grad()
def layer_centroids(
    model: nn.Module,
    layers: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    correct_only: bool = False,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Class centroids of each layer's flattened output over clean images x (uint8 or float), eval mode.

    `correct_only` keeps only the images the model classifies correctly (SLIM's reading of Jin et al.).
    """
    acc = {name: CentroidAccumulator(num_classes) for name in layers}
    with attack_mode(model, "eval"), capture_features(model, layers, detach=True) as feats:
        total = math.ceil(x.shape[0] / max(1, batch_size))
        # Lazy batches: a whole training set converted to float at once would not fit on many GPUs.
        for i, xb in tqdm(
            float_batches(x, batch_size), total=total, desc="centroids", leave=False, disable=not progress
        ):
            yb = y[i : i + batch_size]
            logits = model(xb)
            keep = logits.argmax(1) == yb if correct_only else torch.ones_like(yb, dtype=torch.bool)
            for name in layers:
                acc[name].add(feats[name][keep], yb[keep])
    return {name: a.centroids() for name, a in acc.items()}


@torch.no_grad()
def clustering_hits(
    model: nn.Module,
    layers: Sequence[str],
    centroids: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    p: float = 2.0,
    batch_size: int = 256,
) -> tuple[dict[str, int], int]:
    """({layer: inputs whose cluster label is y}, inputs the classifier gets right), in eval mode.

    Counts, not rates: SAT reports fractions and the analysis percentages, each divided once.
    """
    hits = {name: 0 for name in layers}
    classifier = 0
    with attack_mode(model, "eval"), capture_features(model, layers, detach=True) as feats:
        for i, xb in float_batches(x, batch_size):
            yb = y[i : i + batch_size]
            classifier += int((model(xb).argmax(1) == yb).sum())
            for name in layers:
                hits[name] += int((nearest_centroid(feats[name], centroids[name], p=p) == yb).sum())
    return hits, classifier
