"""robust-train: a Hydra-configured runner for adversarial-robustness experiments."""

__version__ = "0.1.0"
