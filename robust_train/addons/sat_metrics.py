"""SAT's analysis metric: clustering accuracy (Clu.Acc, docs/methods/sat.md#clustering-accuracy; seed Def. 1,
Eq. 2).

Per class c and tapped layer l the centroid is the mean flattened feature of the clean *training* images
of c (eval mode); a test image's cluster label is the class of the nearest centroid in L2 (argmin: the
seed's argmax is a typo), and Clu.Acc^l is the fraction of test images whose cluster label is the true one.

The computation is robust_train.metrics, shared with the layer-wise analysis (`analysis=[clustering]`);
this module keeps SAT's reading of it: fractions in [0, 1], L2, centroids of every training image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from robust_train.metrics import (
    class_centroids,
    clustering_accuracy,
    clustering_hits,
    layer_centroids,
    nearest_centroid,
)

__all__ = ["class_centroids", "clustering_accuracy", "clustering_accuracy_report", "nearest_centroid"]


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
    centroids = layer_centroids(model, layers, train[0], train[1], num_classes, batch_size)
    x, y = test
    if attack is not None:
        x = torch.cat(
            [
                attack(model, x[i : i + batch_size], y[i : i + batch_size])
                for i in range(0, len(x), batch_size)
            ]
        )
    hits, classifier = clustering_hits(model, layers, centroids, x, y, batch_size=batch_size)
    n = int(y.shape[0])
    # An empty test set has no accuracy (NaN, as the mean of no rows), not a division error.
    report = {name: hits[name] / n if n else float("nan") for name in layers}
    report["classifier"] = classifier / n if n else float("nan")
    return report
