"""`results.json`: the source of truth of a run (DESIGN.md §4), and its console table."""

from __future__ import annotations

import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from robust_train.io import atomic_write

RESULTS_FORMAT = "robust-train-results"
RESULTS_VERSION = 1
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
    header = ["checkpoint", "epoch"] + attacks
    rows = []
    for ckpt, entry in per_ckpt.items():
        row = [ckpt, str(entry.get("epoch", "-"))]
        for name in attacks:
            a = entry["attacks"].get(name)
            row.append("-" if a is None else f"{a['accuracy']:.2f}")
        rows.append(row)
    n = next(iter(per_ckpt.values()))["attacks"]
    n_ex = next(iter(n.values()))["n"] if n else 0
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    title = f"accuracy (%) on {n_ex} test images"
    return "\n".join([title, line(header), sep, *(line(r) for r in rows)])
