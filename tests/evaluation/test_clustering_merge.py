"""The merged clustering implementation (robust_train.metrics) reproduces both implementations it
replaced: SAT's metric (robust_train/addons/sat_metrics.py) and the layer-wise analysis
(robust_train/evaluation/analysis.py), whose code as of commit 5cc05bf is kept below as the reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_train.addons import sat_metrics
from robust_train.attacks import attack_mode
from robust_train.data import to_float
from robust_train.evaluation.analysis import clustering_accuracy_layers, layer_centroids
from robust_train.models.features import capture_features, forward_with_features


# ----------------------------------------------------------------------------- the old SAT metric
def _old_class_centroids(feats: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    f = feats.flatten(1).double()
    onehot = F.one_hot(y, num_classes).double()
    counts = onehot.sum(0).unsqueeze(1)
    sums = onehot.t() @ f
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


def _old_nearest_centroid(feats: torch.Tensor, centroids: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    dist = torch.cdist(feats.flatten(1).double(), torch.nan_to_num(centroids, nan=0.0), p=p)
    dist = dist.masked_fill(torch.isnan(centroids).any(dim=1).unsqueeze(0), float("inf"))
    return dist.argmin(dim=1)


@torch.no_grad()
def _old_features(model, x, layers, batch_size):
    chunks = {n: [] for n in layers}
    preds = []
    for i in range(0, x.shape[0], batch_size):
        logits, feats = forward_with_features(model, x[i : i + batch_size], layers, detach=True)
        preds.append(logits.argmax(1))
        for n in layers:
            chunks[n].append(feats[n].flatten(1).double())
    return {n: torch.cat(c) for n, c in chunks.items()}, torch.cat(preds)


def _old_sat_report(model, layers, train, test, num_classes, attack=None, batch_size=256):
    with attack_mode(model, "eval"):
        train_feats, _ = _old_features(model, train[0], layers, batch_size)
        centroids = {n: _old_class_centroids(train_feats[n], train[1], num_classes) for n in layers}
    x, y = test
    if attack is not None:
        x = torch.cat([attack(model, x[i : i + batch_size], y[i : i + batch_size])
                       for i in range(0, len(x), batch_size)])  # fmt: skip
    with attack_mode(model, "eval"):
        test_feats, preds = _old_features(model, x, layers, batch_size)
    report = {
        n: float((_old_nearest_centroid(test_feats[n], centroids[n]) == y).double().mean()) for n in layers
    }
    report["classifier"] = float((preds == y).double().mean())
    return report, centroids


# ----------------------------------------------------------------------------- the old analysis
def _old_batches(x, batch_size):
    for i in range(0, x.shape[0], max(1, batch_size)):
        chunk = x[i : i + batch_size]
        yield i, to_float(chunk) if chunk.dtype == torch.uint8 else chunk


@torch.no_grad()
def _old_layer_centroids(model, layers, x, y, num_classes, batch_size=256, correct_only=False):
    sums, counts = {}, {}
    with attack_mode(model, "eval"), capture_features(model, layers, detach=True) as feats:
        for i, xb in _old_batches(x, batch_size):
            yb = y[i : i + batch_size]
            logits = model(xb)
            keep = logits.argmax(1) == yb if correct_only else torch.ones_like(yb, dtype=torch.bool)
            for name in layers:
                f = feats[name][keep].flatten(1).double()
                onehot = F.one_hot(yb[keep], num_classes).double()
                s, c = onehot.t() @ f, onehot.sum(0)
                sums[name] = s if name not in sums else sums[name] + s
                counts[name] = c if name not in counts else counts[name] + c
    out = {}
    for name in layers:
        c = counts[name].unsqueeze(1)
        out[name] = torch.where(c > 0, sums[name] / c.clamp(min=1), torch.full_like(sums[name], float("nan")))
    return out


@torch.no_grad()
def _old_clustering_accuracy_layers(model, layers, centroids, x, y, p=2.0, batch_size=256):
    correct = {name: 0 for name in layers}
    classifier = 0
    with attack_mode(model, "eval"), capture_features(model, layers, detach=True) as feats:
        for i, xb in _old_batches(x, batch_size):
            yb = y[i : i + batch_size]
            classifier += int((model(xb).argmax(1) == yb).sum())
            for name in layers:
                correct[name] += int((_old_nearest_centroid(feats[name], centroids[name], p=p) == yb).sum())
    n = max(1, x.shape[0])
    return {**{name: 100.0 * c / n for name, c in correct.items()}, "classifier": 100.0 * classifier / n}


# ----------------------------------------------------------------------------- fixtures
class TwoLayerNet(nn.Module):
    """conv -> relu (layer `a`) -> conv (layer `b`) -> pooled linear: two tapped layers of other shapes."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean(dim=(2, 3)))


def _data(seed: int, n: int, num_classes: int, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    # Class-dependent brightness, so centroids differ and the accuracies are neither 0 nor 100.
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.6 + 0.08 * y.view(-1, 1, 1, 1)
    if dtype == torch.uint8:
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), y
    return x.to(dtype), y


@pytest.fixture(scope="module")
def net() -> nn.Module:
    torch.manual_seed(0)
    return TwoLayerNet().train()  # train mode: the metric must switch to eval and restore it


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("batch_size", [256, 7])
def test_sat_report_reproduces_the_old_sat_metric(net: nn.Module, batch_size: int) -> None:
    train, test = _data(0, 60, 5, torch.float64), _data(1, 30, 5, torch.float64)
    model = copy.deepcopy(net).double()
    shift = lambda m, xb, yb: (xb + 0.05).clamp(0, 1)  # noqa: E731 - a deterministic "attack"
    for attack in (None, shift):
        old, old_cents = _old_sat_report(model, ["a", "b"], train, test, 5, attack, batch_size)
        new = sat_metrics.clustering_accuracy_report(model, ["a", "b"], train, test, 5, attack, batch_size)
        assert new == old  # exact: the same fractions of the same counts
        assert 0.0 < old["a"] < 1.0 and 0.0 < old["b"] < 1.0  # not a vacuous comparison
        new_cents = layer_centroids(model, ["a", "b"], train[0], train[1], 5, batch_size)
        for name in ("a", "b"):
            if batch_size >= 60:  # one batch: the same sums in the same order, bit for bit
                assert torch.equal(new_cents[name], old_cents[name])
            else:  # streamed over batches: the sums differ only in rounding order
                torch.testing.assert_close(new_cents[name], old_cents[name], rtol=1e-12, atol=1e-12)
    assert model.training


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
@pytest.mark.parametrize("correct_only", [False, True])
def test_analysis_reproduces_the_old_analysis(net: nn.Module, p: float, correct_only: bool) -> None:
    model = net
    train, test = _data(2, 70, 5), _data(3, 33, 5)  # uint8 images, as the analysis gets them
    old_cents = _old_layer_centroids(model, ["a", "b"], *train, 5, 16, correct_only)
    new_cents = layer_centroids(model, ["a", "b"], *train, 5, 16, correct_only)
    for name in ("a", "b"):  # bit for bit; rows of classes without a kept image are NaN in both
        torch.testing.assert_close(new_cents[name], old_cents[name], rtol=0, atol=0, equal_nan=True)
        assert not torch.isnan(old_cents[name]).all()
    old = _old_clustering_accuracy_layers(model, ["a", "b"], old_cents, test[0], test[1], p, 10)
    new = clustering_accuracy_layers(model, ["a", "b"], new_cents, test[0], test[1], p, 10)
    assert new == old
    assert 0.0 < old["a"] < 100.0  # not a vacuous comparison


def test_sat_helpers_are_the_shared_ones() -> None:
    """SAT's public names are the merged implementation, not a second copy."""
    from robust_train import metrics

    assert sat_metrics.class_centroids is metrics.class_centroids
    assert sat_metrics.nearest_centroid is metrics.nearest_centroid
    assert sat_metrics.clustering_accuracy is metrics.clustering_accuracy
    g = torch.Generator().manual_seed(4)
    feats, y = torch.randn(40, 3, 2, generator=g), torch.randint(0, 4, (40,), generator=g)
    assert torch.equal(metrics.class_centroids(feats, y, 4), _old_class_centroids(feats, y, 4))
    test = torch.randn(25, 6, generator=g, dtype=torch.float64)
    cents = _old_class_centroids(feats, y, 4)
    assert torch.equal(metrics.nearest_centroid(test, cents), _old_nearest_centroid(test, cents))
