"""Hydra finds search-path plugins in the `hydra_plugins` namespace; robust-train's lives in hydra_ext.

With this, Hydra's compose API (notebooks, scripts) also searches installed plugins' `conf/` folders and
$ROBUST_TRAIN_CONFIG_PATH; the command line registers the same class itself.
"""

from robust_train.hydra_ext import RobustTrainSearchPath

__all__ = ["RobustTrainSearchPath"]
