"""The printed results table: SSA/SSAH settings beside their numbers, failed sanity checks loud."""

from __future__ import annotations

from robust_train.tracking.results import format_table


def _evaluation(sanity: dict | None = None) -> dict:
    ssa = {
        "accuracy": 81.25,
        "n": 32,
        "details": {
            "projection": "every_step",
            "mean_linf": 0.03125,
            "max_linf": 0.031372,
            "batch_size": 500,
        },
    }
    best = {"epoch": 3, "attacks": {"clean": {"accuracy": 90.0, "n": 32}, "ssa": ssa}}
    if sanity is not None:
        best["sanity"] = sanity
    return {"suite": "full", "n_examples": 32, "best": best}


def test_ssa_numbers_carry_projection_linf_and_batch_size() -> None:
    text = format_table(_evaluation())
    assert "|       best |     3 | 90.00 | 81.25 |" in text
    assert (
        "ssa [best]: projection every_step, mean L-inf 0.0312, max L-inf 0.0314, attack batch size 500"
        in text
    )


def test_failed_sanity_check_is_loud() -> None:
    sanity = {
        "failed": ["gradient_health"],
        "warnings": [],
        "checks": {"gradient_health": {"detail": "62% of input gradients are zero"}},
    }
    text = format_table(_evaluation(sanity))
    assert "| FAILED |" in text
    assert "!!! SANITY CHECK FAILED [best] gradient_health: 62% of input gradients are zero" in text
    assert "likely overestimated" in text
