"""Shared fixtures: tiny models and inputs, and a Hydra-compose helper."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "robust_train" / "conf"

# Tests run tiny models, where intra-op thread start-up and oversubscription of a small shared CPU cost
# far more than they save (measured on the 2-core CI machine: a 1-epoch run took 7x longer with 2 threads).
torch.set_num_threads(1)

# W&B must never try the network from a test.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


class TinyCNN(nn.Module):
    """A 10-class CNN with BatchNorm, small enough for float64 identities on the CPU."""

    def __init__(self, channels: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.fixture
def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 32, 32, generator=g)
    x[0] = 0.0  # inputs at the box boundary
    x[1] = 1.0
    y = torch.randint(0, 10, (8,), generator=g)
    return x, y


@pytest.fixture
def compose() -> Callable[..., object]:
    """Compose the real Hydra config with overrides, as the CLI would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from robust_train.hydra_ext import install

    def _compose(overrides: list[str] | None = None, config_name: str = "config"):
        install()  # plugins' and users' config folders, schema defaults: as the command line composes
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides or [])

    return _compose


@pytest.fixture
def cli(capsys, monkeypatch) -> Callable[..., tuple[int, str]]:
    """Run a console entry point in-process: `cli(main, prog, argv) -> (exit code, stderr + stdout)`.

    Hydra's full-error mode is off so that the one-line messages users see are what the tests read.
    """
    import sys

    from hydra.core.global_hydra import GlobalHydra

    def run(main: Callable[[], object], prog: str, argv: list[str]) -> tuple[int, str]:
        monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
        monkeypatch.setattr(sys, "argv", [prog, *argv])
        GlobalHydra.instance().clear()
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out = capsys.readouterr()
        return code, out.err + out.out

    return run
