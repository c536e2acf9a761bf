"""A tiny standard-trained model shared by the LAFEAT and SSA tests (trained once per test session)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from robust_train.data import build_dataset, to_float


class SmallNet(nn.Module):
    """Two conv blocks on 16x16 digits; `block2` (16x4x4) is the latent layer, `fc` reads 256 features."""

    def __init__(self, c: int = 8, k: int = 10) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(2 * c * 16, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block2(self.block1(x)).flatten(1))


def half_size(u: torch.Tensor) -> torch.Tensor:
    """uint8 32x32 -> uint8 16x16 (2x2 mean), so the tests run on a quarter of the pixels."""
    return F.avg_pool2d(u.float(), 2).round().to(torch.uint8)


@functools.cache
def trained_small_net() -> dict:
    """SmallNet standard-trained on 1000 mnist5k digits (~95% clean on the test images, a few seconds).

    Returns the model (eval mode), its uint8 training images, and 32 float test images with labels.
    Callers must not modify the model.
    """
    data = build_dataset({"name": "mnist5k", "val_size": 0}, 0)
    train_x, train_y = half_size(data.train_x[:1000]), data.train_y[:1000]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SmallNet()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(4):
            for i in range(0, train_x.shape[0], 100):
                loss = F.cross_entropy(model(to_float(train_x[i : i + 100])), train_y[i : i + 100])
                opt.zero_grad()
                loss.backward()
                opt.step()
    model.eval()
    return {
        "model": model,
        "train_x": train_x,
        "x": to_float(half_size(data.test_x[:32])),
        "y": data.test_y[:32],
    }
