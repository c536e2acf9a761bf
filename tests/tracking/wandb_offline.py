"""Read offline W&B runs back from disk: what `wandb sync` would upload, without an account.

An offline run is `<dir>/wandb/offline-run-<time>-<id>/run-<id>.wandb`: a LevelDB-style log (32 KiB
blocks of records with a 7-byte header: CRC-32C, length, type full/first/middle/last) after a 7-byte
file header, each record a `wandb_internal_pb2.Record` protobuf. This module decodes those records into
the run's name, group, job type, tags, notes, config, summary and history, so tests (and the closing
notes) check what a W&B dashboard will show.

Run as a script on a sweep or run directory to print one line per W&B run:
    python tests/tracking/wandb_offline.py outputs/multirun/2026-12-06_10-00-00
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEADER = b":W&B"
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:4] != HEADER:
        raise ValueError(f"{path} is not a W&B run file")
    pos, out, partial = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            partial = chunk
        elif kind == MIDDLE:
            partial += chunk
        elif kind == LAST:
            out.append(partial + chunk)
            partial = b""
    return out


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """One offline run directory, decoded."""

    path: Path
    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    used_artifacts: list[str] = field(default_factory=list)
    exit_code: int | None = None
    preempting: bool = False  # marked preempting (resumable) before it stopped

    def config_value(self, dotted: str) -> Any:
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node


def _apply_config(config: dict[str, Any], items: Any) -> None:
    for item in items:
        key = _item_key(item)
        value = json.loads(item.value_json)
        # W&B nests a config dict's value under "value" ({"value": ..., "desc": ...}) in some versions.
        if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value:
            value = value["value"]
        config[key] = value


def read_run(run_dir: Path) -> OfflineRun:
    """Decode `<...>/offline-run-*/` (the folder holding run-<id>.wandb)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb in {run_dir}")
    run = OfflineRun(Path(run_dir))
    for raw in _records(files[0]):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id = r.run_id or run.run_id
            run.name = r.display_name or run.name
            run.group = r.run_group or run.group
            run.job_type = r.job_type or run.job_type
            run.tags = list(r.tags) or run.tags
            run.notes = r.notes or run.notes
            _apply_config(run.config, r.config.update)
        elif kind == "config":
            _apply_config(run.config, record.config.update)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "use_artifact":
            run.used_artifacts.append(record.use_artifact.artifact.name)
        elif kind == "preempting":
            run.preempting = True
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def find_runs(root: Path) -> list[OfflineRun]:
    """Every offline run below `root`, in path order."""
    return [read_run(p.parent) for p in sorted(Path(root).glob("**/offline-run-*/run-*.wandb"))]


def main(argv: list[str]) -> None:
    for root in argv or ["."]:
        for run in find_runs(Path(root)):
            steps = [h.get("_step") for h in run.history]
            print(
                json.dumps(
                    {
                        "dir": str(run.path.relative_to(root)),
                        "id": run.run_id,
                        "name": run.name,
                        "group": run.group,
                        "job_type": run.job_type,
                        "threat.eps": run.config_value("threat.eps"),
                        "defense.attack.step": run.config_value("defense.attack.step"),
                        "run.params": run.config_value("run.params"),
                        "checkpoint": run.config_value("checkpoint"),
                        "train_run": run.config_value("train_run"),
                        "best_epoch": run.summary.get("best_epoch"),
                        "steps": f"{steps[0]}..{steps[-1]}" if steps else None,
                        "error": run.summary.get("error"),
                        "exit_code": run.exit_code,
                    }
                )
            )


if __name__ == "__main__":
    main(sys.argv[1:])
