"""Sweeps through Hydra's submitit launcher on this CPU: a two-job sweep, and a job preempted with the
launcher's signal (USR2) that submitit requeues and that resumes from its own last.pt, same W&B run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robust_train.tracking.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = [
    "experiment=demo", "debug=fast", "trainer.progress=false", "eval.n_examples=16",
    "eval.checkpoints=[last]", "trainer.validation.pgd_steps=1",
]  # fmt: skip


def _env() -> dict[str, str]:
    # One thread per job: parallel jobs on a small CPU otherwise fight over the cores.
    return {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}  # fmt: skip


def test_two_job_sweep_through_submitit_local(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [str(BIN / "robust-train"), "-m", "hydra/launcher=submitit_local", *TINY, "logger=none",
         "trainer.max_batches=2", "defense=pgd_at,trades", f"hydra.sweep.dir={sweep}"],
        capture_output=True, text=True, cwd=REPO, env=_env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    defenses = [
        json.loads((sweep / str(i) / "results.json").read_text())["config"]["defense"]["name"] for i in (0, 1)
    ]
    assert defenses == ["pgd_at", "trades"]
    logs = sorted((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("Job completed successfully" in p.read_text() for p in logs)


def _task_pids(sweep: Path) -> list[int]:
    """Processes running a submitit task of this sweep (python -m submitit.core._submit <sweep>/...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and any(str(sweep).encode() in c for c in cmd):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_preempted_job_is_requeued_and_resumes_from_its_own_last_pt(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    job = sweep / "0"
    main = subprocess.Popen(
        [str(BIN / "robust-train"), "-m", "hydra/launcher=submitit_local", *TINY, "logger=wandb",
         "trainer.epochs=3", "trainer.max_batches=6", "seed=0", f"hydra.sweep.dir={sweep}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 400
        while not (job / "last.pt").exists():  # the first epoch is done: there is something to resume
            assert main.poll() is None and time.monotonic() < deadline, main.stdout.read()[-3000:]
            time.sleep(0.5)
        run_id = load_checkpoint(job / "last.pt")["wandb_run_id"]
        pids = _task_pids(sweep)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGUSR2)  # what SLURM / submitit's local controller send before the end
        out, _ = main.communicate(timeout=600)
    finally:
        if main.poll() is None:
            main.kill()
    assert main.returncode == 0, out[-3000:]
    log = next((sweep / ".submitit").glob("*/*_0_log.out")).read_text()
    assert "Requeued job" in next((sweep / ".submitit").glob("*/*_0_log.err")).read_text() + log
    assert "resumed from" in log and str(job / "last.pt") in log  # the requeued job, in the same dir
    res = json.loads((job / "results.json").read_text())
    assert res["train"]["epochs_completed"] == 3 and res["eval"]["last"]["epoch"] == 3
    assert res["wandb"]["run_id"] == run_id  # resumed into the same W&B run
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (job / "wandb").glob("offline-run-*")) == [
        run_id,
        run_id,
    ]
