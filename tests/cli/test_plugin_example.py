"""examples/plugin, installed as a user would (non-editable, outside the checkout), runs through the CLI:
its defense, add-on and attack are selected from the command line and compose with ours.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """`pip install --no-deps --target` of a copy of examples/plugin (nothing left in the checkout)."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(
        REPO / "examples" / "plugin", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    )
    site = tmp / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (site / "robust_train_example" / "conf" / "defense" / "alp.yaml").is_file()
    return site


def run_cli(site: Path, cwd: Path, *args: str, env_extra: dict[str, str] | None = None):
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **(env_extra or {})}  # fmt: skip
    return subprocess.run(
        [str(BIN / "robust-train"), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900
    )


def test_plugin_parts_run_through_the_cli(plugin_site: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(
        plugin_site, tmp_path,
        "debug=fast", "logger=none", "trainer.progress=false", "eval=quick", "eval.checkpoints=[last]",
        "eval.sanity.enabled=false",
        "defense=alp", "defense.lam=0.25", "addons=[logit_squeezing]",
        "+attack@eval.attacks.rfgsm=rfgsm", f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    config = results["config"]
    assert config["defense"]["name"] == "alp" and config["defense"]["lam"] == 0.25
    assert config["addons"]["logit_squeezing"]["lam"] == 0.05  # the plugin schema's default
    attacks = results["eval"]["last"]["attacks"]
    assert set(attacks) == {"clean", "pgd20", "rfgsm"}
    assert 0.0 <= attacks["rfgsm"]["accuracy"] <= 100.0 and attacks["rfgsm"]["n"] == 64
    assert attacks["rfgsm"]["attack"]["name"] == "rfgsm"
    (epoch,) = results["train"]["history"]
    # The plugin defense's own term and the plugin add-on's term were part of the trained loss.
    assert epoch["train/logit_pairing"] > 0 and epoch["train/logit_squeezing/penalty"] > 0


def test_plugin_options_are_checked_like_ours(plugin_site: Path, tmp_path: Path) -> None:
    proc = run_cli(plugin_site, tmp_path, "debug=fast", "logger=none", "defense=alpp")
    assert proc.returncode == 2, proc.stderr
    assert "did you mean `alp`?" in proc.stderr and "trades_awp" in proc.stderr  # plugin's and ours listed
    assert list(tmp_path.iterdir()) == []
