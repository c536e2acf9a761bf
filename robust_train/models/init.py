"""`model.init_from=<file>`: start a training run from someone's weights (fine-tuning).

The file is one of our checkpoints (last.pt, best.pt, ema.pt: the weights that checkpoint is evaluated
with, so best.pt of an EMA run and ema.pt give the averaged ones), a RobustBench model-zoo file, or any
plain state_dict (`{'state_dict': ...}`, `module.` prefixes and the like are handled by
`robust_train.zoo.load_weights`). Only the model's weights are taken: the optimizer, the epoch, the RNG
states and the schedule start fresh. A run directory that already holds last.pt resumes from it and
ignores init_from, so a preempted fine-tuning run continues where it stopped instead of starting over.

Refused with one line: a file that is missing or unreadable, weights whose keys or shapes do not fit the
model (the first mismatches are named), and weights trained with another input normalization than the
model applies when the file says so (normalization buffers in it, our run config, RobustBench's
definition or a model card). A file that does not say is loaded with a note stating what the model does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from robust_train.errors import CheckpointError
from robust_train.models.base import Normalize
from robust_train.models.dm_wide_resnet import DM_STATS

# Normalization constants agree when within this absolute difference: the DM code's rounded CIFAR-100
# statistics (0.5071, ...) and our loader's exact ones (0.50707...) are one convention; CIFAR-10's std
# 0.2471 and the 0.2023 of other codes are two.
STATS_TOLERANCE = 1e-3

# (normalize mode, mean, std) of a model's input pipeline; mean/std None for "none".
Normalization = tuple[str, tuple[float, ...] | None, tuple[float, ...] | None]


def model_normalization(model: nn.Module) -> Normalization | None:
    """What `model` does to its [0, 1] input before the first layer, or None when it does not say."""
    base = getattr(model, "_orig_mod", model)
    step = getattr(base, "normalize", None)
    if isinstance(step, Normalize):
        return "meanstd", _values(step.mean), _values(step.std)
    if isinstance(step, nn.Identity):
        return "none", None, None
    return None


def _values(t: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in (t.flatten().tolist() if hasattr(t, "flatten") else t))


def _describe(norm: Normalization) -> str:
    mode, mean, std = norm
    if mode == "none":
        return "no normalization (raw [0, 1] pixels)"
    return f"(x - mean) / std with mean={_short(mean)} std={_short(std)}"


def _short(values: Sequence[float] | None) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values or ()) + "]"


def _config_normalization(meta: Mapping[str, Any]) -> Normalization | None:
    """The normalization one of our checkpoints was trained with, from its run config."""
    node = (meta.get("config") or {}).get("model") or {}
    mode = node.get("normalize", "meanstd")
    if mode == "none":
        return "none", None, None
    stats = node.get("stats")
    if isinstance(stats, str) and stats in DM_STATS:
        mean, std = DM_STATS[stats]
        return "meanstd", tuple(mean), tuple(std)
    if meta.get("mean") is None or meta.get("std") is None:
        return None
    return "meanstd", _values(meta["mean"]), _values(meta["std"])


def file_normalization(loaded: Any) -> tuple[Normalization, str] | None:
    """(normalization, where it is stated) of loaded weights, or None when the file does not say."""
    from robust_train import zoo

    meta = loaded.meta
    buffers = meta.get("normalization")
    if buffers:
        names = list(buffers)
        mean, std = buffers[names[0]], buffers[names[1]]
        return ("meanstd", _values(mean), _values(std)), f"its {'/'.join(names[:2])} buffers"
    if loaded.kind == "robust-train":
        found = _config_normalization(meta)
        return None if found is None else (found, "its run config")
    if loaded.kind == "robustbench":
        where = meta.get("zoo") or {}
        card = meta.get("card")
        block = zoo.card_block(card, Path(meta["path"]).with_suffix(".json")) if card else None
        if block is not None:
            if str(block["model"].get("normalize", "meanstd")) == "none":
                return ("none", None, None), "its model card"
            mean, std = _values(block.get("mean") or ()), _values(block.get("std") or ())
            return ("meanstd", mean, std), "its model card"
        key = (str(where.get("dataset")), str(where.get("threat_model")), str(where.get("name")))
        entry = zoo.ZOO.get(key)
        if entry is not None:
            return (entry.normalize, entry.mean, entry.std), f"RobustBench's definition of {entry.name}"
    return None


def _same(a: Normalization, b: Normalization) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "none":
        return True
    pairs = [(a[1], b[1]), (a[2], b[2])]
    return all(
        x is not None and y is not None and len(x) == len(y)
        and all(math.isclose(u, v, rel_tol=0.0, abs_tol=STATS_TOLERANCE) for u, v in zip(x, y, strict=True))
        for x, y in pairs
    )  # fmt: skip


def initialize_from(
    model_cfg: Any,
    model: nn.Module,
    resume_state: Mapping[str, Any] | None = None,
    numbers: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Load `model.init_from` into `model` (not when resuming); the record of where the weights came from.

    The record (path, sha256, kind, weights, source, changes) is kept in the checkpoints, so a resumed
    run reports the same origin; `numbers` (results.json's config and the W&B config) gets the file's
    SHA-256 as `model.init_from_sha256`. Returns None when init_from is not set.
    """
    get = model_cfg.get if hasattr(model_cfg, "get") else lambda key: getattr(model_cfg, key, None)
    path_text = get("init_from")
    if not path_text:
        return None
    if resume_state is not None:
        record = resume_state.get("init_from")
        print(
            f"init_from: not loaded, the run resumes from its last.pt (started from {path_text})", flush=True
        )
    else:
        record = load_initial_weights(model, Path(str(path_text)).expanduser())
    if record and numbers is not None and isinstance(numbers.get("model"), dict):
        numbers["model"]["init_from_sha256"] = record.get("sha256")
    return dict(record) if record else None


def load_initial_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load the weights of `path` into `model`; CheckpointError (one line) when they do not fit."""
    from robust_train.zoo import load_into, load_weights

    source = f"model.init_from={path}"
    if not path.is_file():
        raise CheckpointError(f"{source} does not exist (a checkpoint, state_dict or RobustBench .pt file)")
    # Our checkpoints: the weights the checkpoint is evaluated with (`auto`), so best.pt of an EMA run and
    # ema.pt give the averaged ones and last.pt the trained ones.
    loaded = load_weights(path, weights="auto")
    which: str | None = loaded.meta.get("weights") if loaded.kind == "robust-train" else None
    stated = file_normalization(loaded)
    ours = model_normalization(model)
    note = ""
    if stated is not None and ours is not None and not _same(stated[0], ours):
        raise CheckpointError(
            f"{source}: the weights were trained with {_describe(stated[0])} ({stated[1]}), but this model "
            f"applies {_describe(ours)}; set model.normalize (and the dataset, or model.stats) to match"
        )
    if stated is None and ours is not None:
        note = f"; the file does not say how its inputs were normalized: the model applies {_describe(ours)}"
    changes = load_into(model, loaded, source=source)
    meta = loaded.meta
    origin: dict[str, Any] = {}
    if loaded.kind == "robust-train":
        config_model = (meta.get("config") or {}).get("model") or {}
        origin = {"model": config_model.get("name"), "epoch": meta.get("epoch")}
    elif loaded.kind == "robustbench":
        origin = dict(meta.get("zoo") or {})
    record = {
        "path": str(path.resolve()),
        "sha256": meta.get("sha256"),
        "kind": loaded.kind,
        "weights": which,
        "source": origin,
        "changes": list(changes),
    }
    what = ", ".join([loaded.kind, *([f"{which} weights"] if which else []), *changes])
    print(f"init_from: loaded {path} ({what}; sha256 {str(meta.get('sha256'))[:12]}){note}", flush=True)
    return record
