"""Sanity checks of a robustness evaluation: signs that the reported numbers overestimate robustness.

Modelled on the checks AutoAttack runs on itself and on the advice of Athalye et al. (2018) and
Carlini et al. (2019, "On evaluating adversarial robustness"): an honest evaluation satisfies all of

- `robust_le_clean`        no attack leaves accuracy above clean accuracy (same points);
- `more_steps`             PGD with 4x the steps is not weaker than PGD-k (same points);
- `more_restarts`          PGD-k with restarts is not weaker than one restart;
- `large_eps`              at a very large radius accuracy falls to about zero;
- `blackbox_not_stronger`  the black-box Square attack does not beat the white-box attacks
                           (if it does, the gradients are misleading the white-box attacks);
- `gradient_health`        few examples have a zero or non-finite input gradient (shattered,
                           quantized or saturated gradients give zeros);
- `deterministic_forward`  two eval-mode forwards agree (a warning: a randomized model needs
                           expectation-over-transformation attacks, which the suite does not run).

All checks run on a small subset in fp32 (low precision can itself mask gradients), with their own RNG
stream so they never change the rest of the run. Failing checks have severity `fail` (the results
table says so loudly); `deterministic_forward` has severity `warn`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from robust_train.attacks import PGD, ThreatModel
from robust_train.data import to_float as pixels_to_float
from robust_train.schema import (
    Flag,
    NonNegativeInt,
    Number,
    PositiveInt,
    PositiveNumber,
    Schema,
    UnitNumber,
    to_float,
    validate_node,
)

Percent = Annotated[Number, Field(ge=0, le=100)]


class SanityConfig(Schema):
    """`eval.sanity`: the checks' budget and thresholds, on a small fp32 subset of the evaluated images."""

    enabled: Flag = True
    n_examples: PositiveInt = 64  # the first N evaluated test images
    batch_size: PositiveInt = 64
    pgd_steps: PositiveInt = 10  # PGD-k vs PGD-4k with 2 restarts: more effort must not raise accuracy
    large_eps: PositiveNumber | None = None  # null: 0.5 (linf) or 0.5*sqrt(pixels) (l2)
    square_queries: NonNegativeInt = 200  # black-box Square must not beat the white-box attacks
    tolerance: Percent = 3.0  # accuracy points (%) of slack for the comparisons (small-sample noise)
    max_large_eps_acc: Percent = 10.0  # accuracy (%) allowed at large_eps
    max_dead_grad_frac: UnitNumber = 0.1  # fraction of examples whose input gradient is zero/non-finite


CHECKS = (
    "robust_le_clean",
    "more_steps",
    "more_restarts",
    "large_eps",
    "blackbox_not_stronger",
    "gradient_health",
    "deterministic_forward",
)


def sanity_settings(cfg: Mapping[str, Any] | SanityConfig | None) -> dict[str, Any]:
    """`eval.sanity` validated, defaults filled in (an absent node means enabled with defaults)."""
    return validate_node(SanityConfig, cfg, "eval.sanity").model_dump()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-example correctness (bool) of `model` on float images."""
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size])
    return torch.cat(out)


def _attack(model: nn.Module, attack: Callable, x: torch.Tensor, y: torch.Tensor, bs: int) -> torch.Tensor:
    """Per-example correctness after the attack, in batches."""
    adv = [attack(model, x[i : i + bs], y[i : i + bs]) for i in range(0, x.shape[0], bs)]
    return _accuracy(model, torch.cat(adv), y, bs)


def _constant_prediction(model: nn.Module, x: torch.Tensor, batch_size: int) -> int | None:
    """The class the model predicts for every input (clean and uniform noise), or None if it varies."""
    with torch.no_grad():
        noise = torch.rand_like(x[:batch_size])
        preds = torch.cat([model(b).argmax(1) for b in (*x.split(batch_size), noise)])
    return int(preds[0]) if bool((preds == preds[0]).all()) else None


def _pct(correct: torch.Tensor) -> float:
    return 100.0 * float(correct.float().mean()) if correct.numel() else 0.0


def _check(passed: bool, value: Any, threshold: Any, detail: str, severity: str = "fail") -> dict[str, Any]:
    return {
        "passed": bool(passed),
        "severity": severity,
        "value": value,
        "threshold": threshold,
        "detail": detail,
    }


def _margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Best other logit minus the true logit: its gradient does not vanish when softmax saturates."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -float("inf")).amax(1)
    return other - true


def gradient_health(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Fractions of examples whose input gradient (margin loss) is all zero or has a non-finite entry."""
    zero = nonfinite = 0
    zero_entries = 0.0
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].clone().requires_grad_(True)
        loss = _margin_loss(model(xb), y[i : i + batch_size]).sum()
        (grad,) = torch.autograd.grad(loss, xb, allow_unused=True)
        if grad is None:  # the output does not depend on the input at all
            grad = torch.zeros_like(xb)
        flat = grad.flatten(1)
        bad = ~torch.isfinite(flat).all(1)
        nonfinite += int(bad.sum())
        zero += int(((flat == 0).all(1) & ~bad).sum())
        zero_entries += float((flat == 0).float().mean(1).sum())
    n = max(x.shape[0], 1)
    return {"zero_frac": zero / n, "nonfinite_frac": nonfinite / n, "zero_entry_frac": zero_entries / n}


def _square(model: nn.Module, threat: ThreatModel, x: torch.Tensor, y: torch.Tensor, queries: int, seed: int):
    """The official Square attack (pyautoattack); None when the package is missing."""
    try:
        from pyautoattack.square import SquareAttack
    except ImportError:
        try:
            from autoattack.square import SquareAttack
        except ImportError:
            return None
    attack = SquareAttack(
        model,
        norm={"linf": "Linf", "l2": "L2"}[threat.norm],
        n_queries=int(queries),
        eps=threat.eps,
        p_init=0.8 if threat.norm == "linf" else 0.3,
        n_restarts=1,
        seed=seed,
        verbose=False,
        device=x.device,
    )
    return attack.perturb(x, y)


def run_sanity_checks(
    model: nn.Module,
    x_uint8: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    cfg: Mapping[str, Any] | None = None,
    suite_results: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run every check on the first `n_examples` images; returns flags for results.json.

    `suite_results` (the eval suite's per-attack results on the full evaluated set) feed
    `robust_le_clean`; the rest is computed here on the subset.
    """
    s = sanity_settings(cfg)
    start = time.perf_counter()
    n = min(int(s["n_examples"]), x_uint8.shape[0])
    bs = int(s["batch_size"])
    tol = to_float(s["tolerance"], "eval.sanity.tolerance")
    k = int(s["pgd_steps"])
    x, y = pixels_to_float(x_uint8[:n]).float(), y[:n]
    checks: dict[str, dict[str, Any]] = {}
    was_training = model.training
    device = x.device
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.autocast(device.type, enabled=False):
            torch.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed_all(seed)
            clean = _accuracy(model, x, y, bs)
            clean_acc = _pct(clean)

            # 1. robust <= clean, on the suite's points and on the subset.
            worst = []
            for name, res in (suite_results or {}).items():
                base = (suite_results or {}).get("clean")
                if name != "clean" and base is not None and res["accuracy"] > base["accuracy"] + 1e-9:
                    worst.append(f"{name} {res['accuracy']:.2f}% > clean {base['accuracy']:.2f}%")

            def pgd(steps: int, restarts: int = 1, eps: float | None = None) -> PGD:
                tm = threat if eps is None else ThreatModel(norm=threat.norm, eps=eps)
                return PGD(tm, steps=steps, step_size=2.5 * tm.eps / max(steps, 1), restarts=restarts)

            weak = _attack(model, pgd(k), x, y, bs)
            if bool((weak & ~clean).any()):
                worst.append(f"PGD-{k} leaves {int((weak & ~clean).sum())} misclassified points correct")
            checks["robust_le_clean"] = _check(
                not worst, _pct(weak), clean_acc, "; ".join(worst) or "every attack <= clean accuracy"
            )

            # 2. more steps and more restarts never raise accuracy (same points, tolerance for noise).
            strong = _attack(model, pgd(4 * k), x, y, bs)
            restarts = _attack(model, pgd(k, restarts=2), x, y, bs)
            weak_acc, strong_acc, restart_acc = _pct(weak), _pct(strong), _pct(restarts)
            checks["more_steps"] = _check(
                strong_acc <= weak_acc + tol,
                strong_acc,
                weak_acc + tol,
                f"PGD-{4 * k} {strong_acc:.2f}% vs PGD-{k} {weak_acc:.2f}%",
            )
            checks["more_restarts"] = _check(
                restart_acc <= weak_acc + tol,
                restart_acc,
                weak_acc + tol,
                f"PGD-{k} x2 restarts {restart_acc:.2f}% vs 1 restart {weak_acc:.2f}%",
            )

            # 3. a huge radius must break the model.
            large = s.get("large_eps")
            if large is None:
                large = 0.5 if threat.norm == "linf" else 0.5 * math.sqrt(x[0].numel())
            large = to_float(large, "eval.sanity.large_eps")
            big_acc = _pct(_attack(model, pgd(2 * k, eps=large), x, y, bs))
            limit = to_float(s["max_large_eps_acc"], "eval.sanity.max_large_eps_acc")
            detail = f"PGD-{2 * k} at eps={large:g}: {big_acc:.2f}% accuracy"
            constant = _constant_prediction(model, x, bs)
            if constant is not None and big_acc > limit:
                # A model that ignores its input keeps the frequency of its one class at any radius: that
                # is not an attack failure (typically an untrained model), so it cannot be judged here.
                detail += f" (not judged: the model predicts class {constant} for every input)"
                limit = big_acc
            checks["large_eps"] = _check(big_acc <= limit, big_acc, limit, detail)

            # 4. black-box Square must not beat the white-box attacks.
            white = min(weak_acc, strong_acc, restart_acc)
            queries = int(s["square_queries"])
            if queries > 0:
                adv = _square(model, threat, x, y, queries, seed)
                if adv is None:
                    checks["blackbox_not_stronger"] = _check(
                        True, None, None, "skipped: pyautoattack missing"
                    )
                else:
                    sq = _pct(_accuracy(model, adv, y, bs) & clean)
                    checks["blackbox_not_stronger"] = _check(
                        sq >= white - tol,
                        sq,
                        white - tol,
                        f"Square ({queries} queries) {sq:.2f}% vs best white-box {white:.2f}%",
                    )

            # 5. gradient health.
            g = gradient_health(model, x, y, bs)
            dead = g["zero_frac"] + g["nonfinite_frac"]
            max_dead = to_float(s["max_dead_grad_frac"], "eval.sanity.max_dead_grad_frac")
            checks["gradient_health"] = _check(
                dead <= max_dead,
                round(dead, 4),
                max_dead,
                f"{100 * g['zero_frac']:.1f}% of examples have a zero input gradient, "
                f"{100 * g['nonfinite_frac']:.1f}% a non-finite one",
            )
            checks["gradient_health"].update({k_: round(v, 4) for k_, v in g.items()})

            # 6. randomness in the forward pass.
            with torch.no_grad():
                a, b = model(x[:bs]), model(x[:bs])
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            checks["deterministic_forward"] = _check(
                diff == 0.0,
                diff,
                0.0,
                "two eval-mode forwards agree"
                if diff == 0.0
                else f"eval-mode forwards differ (max |diff| {diff:.3g}): attack with EOT",
                severity="warn",
            )
    finally:
        model.train(was_training)
    failed = [name for name, c in checks.items() if not c["passed"] and c["severity"] == "fail"]
    warned = [name for name, c in checks.items() if not c["passed"] and c["severity"] == "warn"]
    return {
        "passed": not failed,
        "failed": failed,
        "warnings": warned,
        "n": n,
        "clean_acc": clean_acc,
        "checks": checks,
        "time_s": round(time.perf_counter() - start, 3),
    }


def summary_values(kind: str, report: Mapping[str, Any]) -> dict[str, Any]:
    """Flat W&B summary keys of one checkpoint's report (sanity/<kind>/...)."""
    out: dict[str, Any] = {f"sanity/{kind}/passed": bool(report.get("passed", True))}
    for name, c in (report.get("checks") or {}).items():
        out[f"sanity/{kind}/{name}"] = bool(c["passed"])
    return out
