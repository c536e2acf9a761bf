"""Evaluation: the attack-suite runner."""

from robust_train.evaluation.suite import build_suite, evaluate_accuracy, run_suite

__all__ = ["build_suite", "evaluate_accuracy", "run_suite"]
