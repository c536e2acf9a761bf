"""`results.json`: the source of truth of a run (README "Layout"), and its console table."""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from robust_train.errors import ResultsError
from robust_train.io import atomic_write

RESULTS_FORMAT = "robust-train-results"
# Version 2: CW attacks ascend the Carlini-Wagner margin (version 1 ran cross-entropy under the CW
# label); eps and step are numbers in the stored config.
RESULTS_VERSION = 2
READABLE_VERSIONS = (1, 2)
CE_AS_CW_VERSIONS = (1,)
_PACKAGES = (
    "robust_train",
    "torch",
    "torchvision",
    "hydra-core",
    "omegaconf",
    "wandb",
    "pyautoattack",
    "numpy",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on, and Python's."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch  # the module's own version carries the build tag (e.g. +cu132)

    versions["torch"] = torch.__version__
    versions["cuda"] = torch.version.cuda
    return versions


def git_sha(start: Path | None = None) -> str | None:
    """The commit of the source tree robust-train runs from, when it is a git checkout."""
    where = start or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def new_results(config: dict[str, Any], seed: int, device: str, run_dir: Path) -> dict[str, Any]:
    """The skeleton every results file starts from."""
    return {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "run_dir": str(run_dir),
        "seed": seed,
        "device": device,
        "git_sha": git_sha(),
        "versions": package_versions(),
        "config": config,
        "train": {},
        "eval": {},
    }


def write_results(results: dict[str, Any], path: Path) -> None:
    """Write results atomically as indented JSON."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2, sort_keys=False, default=str)
            f.write("\n")

    atomic_write(path, write)


def read_results(path: Path | str) -> dict[str, Any]:
    """Read a results.json; ResultsError if unreadable, not a robust-train file, or another version."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"results file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f"results file {path} is unreadable (truncated or not JSON): {err}") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ResultsError(f"{path} is not a robust-train results file (no format: {RESULTS_FORMAT})")
    if data.get("version") not in READABLE_VERSIONS:
        raise ResultsError(
            f"{path} has results format version {data.get('version')!r}; this robust-train reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}: use the robust-train that wrote it, or "
            "rerun the evaluation"
        )
    return data


def ce_labelled_cw(data: Mapping[str, Any]) -> set[str]:
    """Attack names whose numbers in this results file were computed with cross-entropy but labelled CW.

    Before format version 2 a `cw` attack (or `pgd` with `loss: cw`) ascended cross-entropy: its
    accuracy is a second PGD number, not a Carlini-Wagner one.
    """
    if data.get("version") not in CE_AS_CW_VERSIONS:
        return set()
    names: set[str] = set()
    for entry in (data.get("eval") or {}).values():
        for name, a in ((entry.get("attacks") if isinstance(entry, Mapping) else None) or {}).items():
            spec = a.get("attack") if isinstance(a, Mapping) else None
            if isinstance(spec, Mapping) and (spec.get("name") == "cw" or spec.get("loss") == "cw"):
                names.add(str(name))
    return names


def format_table(evaluation: dict[str, Any]) -> str:
    """A plain-text table: one row per checkpoint, one column per attack (accuracy in %)."""
    per_ckpt = {k: v for k, v in evaluation.items() if isinstance(v, dict) and "attacks" in v}
    if not per_ckpt:
        return "(no evaluation results)"
    attacks: list[str] = []
    for entry in per_ckpt.values():
        for name in entry["attacks"]:
            if name not in attacks:
                attacks.append(name)
    # A sanity column once any checkpoint was checked (evaluation/sanity.py); failures also get loud
    # lines under the table, so a masked evaluation cannot pass for a robust model.
    checked = any(isinstance(e.get("sanity"), dict) for e in per_ckpt.values())
    header = ["checkpoint", "epoch"] + attacks + (["sanity"] if checked else [])
    rows = []
    for ckpt, entry in per_ckpt.items():
        row = [checkpoint_label(ckpt, entry), str(entry.get("epoch", "-"))]
        for name in attacks:
            a = entry["attacks"].get(name)
            row.append("-" if a is None else f"{a['accuracy']:.2f}")
        if checked:
            report = entry.get("sanity")
            if not isinstance(report, dict):
                row.append("-")
            else:
                row.append("FAILED" if report.get("failed") else ("warn" if report.get("warnings") else "ok"))
        rows.append(row)
    n = next(iter(per_ckpt.values()))["attacks"]
    n_ex = next(iter(n.values()))["n"] if n else 0
    title = f"accuracy (%) on {n_ex} test images"
    return "\n".join(
        [*attack_lines(per_ckpt), title, *pipe_table(header, rows), *projection_lines(per_ckpt),
         *failure_lines(per_ckpt)]
    )  # fmt: skip


def checkpoint_label(kind: str, entry: Mapping[str, Any]) -> str:
    """The checkpoint kind, with the weights it was evaluated with when they are not its own.

    best.pt of a run with weight averaging is evaluated with the averaged weights (`best (ema)`); the
    kind `ema` and checkpoints evaluated with their trained weights show the kind alone.
    """
    weights = entry.get("weights")
    return f"{kind} ({weights})" if weights == "ema" and kind != "ema" else kind


def attack_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """One line per attack with the radius and step it actually used (numbers, after eps/4 is resolved).

    Printed above the results table so that a number cannot be read without the budget behind it.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for entry in evaluation.values():
        for name, a in ((entry.get("attacks") if isinstance(entry, Mapping) else None) or {}).items():
            spec = a.get("attack") if isinstance(a, Mapping) else None
            if name in seen or not isinstance(spec, Mapping) or spec.get("eps") is None:
                continue
            seen.add(name)
            parts = [f"{spec.get('norm', '?')} eps {float(spec['eps']):.6g}"]
            if spec.get("step_size") is not None:
                parts.append(f"step {float(spec['step_size']):.6g}")
            for key, label in (("steps", "steps"), ("iterations", "iterations"), ("restarts", "restarts")):
                if spec.get(key) is not None:
                    parts.append(f"{label} {spec[key]}")
            if spec.get("loss") is not None:
                parts.append(f"loss {spec['loss']}")
            if spec.get("version") is not None:
                parts.append(f"version {spec['version']}")
            lines.append(f"{name} ({spec.get('name', name)}): " + ", ".join(parts))
    return lines


def pipe_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Console table lines: a header, a rule and right-aligned cells, each column as wide as its widest."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def projection_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """Under the table, for every SSA/SSAH number: the projection mode, perturbation size and batch size.

    SSA/SSAH numbers depend on all three (docs/methods/ssa.md#bounded-evaluation), so they are printed beside
    the
    accuracy, not only stored in results.json.
    """
    lines: list[str] = []
    for kind, entry in evaluation.items():
        for name, a in (entry.get("attacks") or {}).items():
            d = a.get("details") if isinstance(a, Mapping) else None
            if isinstance(d, Mapping) and "projection" in d:
                lines.append(
                    f"{name} [{kind}]: projection {d['projection']}, mean L-inf {d.get('mean_linf', 0):.4f}, "
                    f"max L-inf {d.get('max_linf', 0):.4f}, attack batch size {d.get('batch_size')}"
                )
    return lines


def failure_lines(evaluation: Mapping[str, Any]) -> list[str]:
    """Loud lines for the results table: one per checkpoint whose checks failed or warned."""
    lines: list[str] = []
    for kind, entry in evaluation.items():
        report = entry.get("sanity") if isinstance(entry, Mapping) else None
        if not report:
            continue
        for name in report.get("failed", []):
            lines.append(f"!!! SANITY CHECK FAILED [{kind}] {name}: {report['checks'][name]['detail']}")
        for name in report.get("warnings", []):
            lines.append(f"warning: sanity [{kind}] {name}: {report['checks'][name]['detail']}")
    if any(line.startswith("!!!") for line in lines):
        lines.append(
            "!!! The robust accuracies above are likely overestimated (gradient masking or a weak "
            "attack); do not report them before an adaptive evaluation."
        )
    return lines
