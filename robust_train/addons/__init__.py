"""Add-on methods (SLIM, SAT, LAD, ISEAT, RWT) plug into the training step through `Addon` hooks."""

from robust_train.addons.base import Addon

__all__ = ["Addon"]
