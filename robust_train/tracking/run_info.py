"""Who a run is: its name in a sweep, its command-line overrides, where it ran and on what.

W&B shows runs by name, so the jobs of `defense.beta=1,6` need the swept values in their names to be
told apart; the W&B config and results.json get the overrides, run dir, device, parameter count and
the code's git commit, so a dashboard column can filter by any of them. Nothing here imports Hydra:
the command-line layer (cli.py) reads Hydra and passes a `JobInfo`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from robust_train import __version__
from robust_train.tracking.results import git_sha

if TYPE_CHECKING:  # torch is imported where a device or model exists; cli.py imports this module early
    import torch

# Keys that never tell runs apart.
_NOT_SWEPT = ("hydra",)


@dataclass
class JobInfo:
    """One Hydra job as the commands see it.

    `overrides` are the job's own command-line overrides (`defense.beta=6`); `swept` are the keys a
    multirun varies (`defense.beta`), empty for a single run; `num` is the job's number in a sweep and
    `sweep_dir` the sweep's directory.
    """

    overrides: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)
    num: int | None = None
    multirun: bool = False
    sweep_dir: str | None = None


def _key_and_value(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def swept_overrides(job: JobInfo, omit: tuple[str, ...] = ()) -> list[str]:
    """The job's overrides of the swept keys, as written (`defense.beta=6`), in command-line order;
    keys in `omit` (and their subkeys) left out."""
    swept = set(job.swept)
    skip = _NOT_SWEPT + tuple(omit)
    out = []
    for override in job.overrides:
        key, value = _key_and_value(override)
        if key in swept and not any(key == k or key.startswith(k + ".") for k in skip):
            out.append(f"{key}={value}")
    return out


def unique_name(base: str, job: JobInfo | None, in_base: tuple[str, ...] = ()) -> str:
    """`base` with the swept values of a multirun job (`... defense.beta=6 trainer.lr=0.1`).

    `in_base` are keys whose value the base already shows (`seed` in the default `-s<seed>`). A job
    whose sweep could not be read keeps names apart by its job number.
    """
    if job is None or not job.multirun:
        return base
    values = swept_overrides(job, omit=("name", *in_base))
    if values:
        return f"{base} {' '.join(values)}"
    if job.swept or job.num is None:  # only keys the base shows were swept: the base is unique
        return base
    return f"{base} job{job.num}"


def device_description(device: torch.device) -> str:
    """`cpu`, or `cuda:0 (NVIDIA H100 80GB HBM3)`: the index alone does not say which card ran."""
    import torch

    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_metadata(
    job: JobInfo | None, run_dir: Path, device: torch.device, model: torch.nn.Module | None
) -> dict[str, Any]:
    """The `run` node of the W&B config and results.json: how to find and repeat this run."""
    job = job or JobInfo()
    return {
        "overrides": list(job.overrides),
        "swept": swept_overrides(job),
        "job": job.num,
        "dir": str(Path(run_dir).resolve()),
        "device": device_description(device),
        "params": parameter_count(model) if model is not None else None,
        "git_sha": git_sha(),
        "version": __version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else None,
    }
