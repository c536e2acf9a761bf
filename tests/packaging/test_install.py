"""A non-editable install works outside the checkout: the wheel ships every config, and the installed
`robust-train` runs `debug=fast` from an empty directory with the package's own configs.

The wheel is installed with `pip install --no-deps --target` and put on PYTHONPATH, so the test reuses
this environment's torch instead of downloading it into a fresh venv (README "Installing anywhere"
gives the fresh-venv commands). Slow: it builds a wheel and trains one tiny run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "robust_train", "hydra_plugins"]


def _pip(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--quiet"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (no build/ or egg-info left in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src))
    (built,) = (tmp / "dist").glob("robust_train-*.whl")
    return built


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    _pip("install", "--no-deps", "--target", str(target), str(wheel))
    return target


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ROBUST_TRAIN_CONFIG_PATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(site), WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="0",
               OMP_NUM_THREADS="1")  # fmt: skip
    return env


def test_wheel_ships_every_config_and_the_search_path_plugin(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {str(p.relative_to(REPO)) for p in (REPO / "robust_train" / "conf").rglob("*.yaml")}
    assert len(configs) > 100 and configs <= names, sorted(configs - names)
    assert "hydra_plugins/robust_train_searchpath/__init__.py" in names
    assert not any(n.startswith(("tests/", "examples/", "scripts/")) for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("robust-train = robust_train.cli:train_main", "robust-eval = robust_train.cli:eval_main"):
        assert script in text


def test_installed_copy_is_imported_not_the_checkout(site: Path, tmp_path: Path) -> None:
    code = "import robust_train, robust_train.cli as c; print(robust_train.__file__); print(c.CONFIG_DIR)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_env(site),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    module, conf = proc.stdout.split()
    assert Path(module).is_relative_to(site) and Path(conf) == site / "robust_train" / "conf"


def test_robust_train_runs_from_an_empty_directory(site: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "empty"
    workdir.mkdir()
    proc = subprocess.run(
        [str(site / "bin" / "robust-train"), "debug=fast", "logger=none", "trainer.progress=false"],
        cwd=workdir, env=_env(site), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_path,) = workdir.glob("outputs/*/*/results.json")
    results = json.loads(results_path.read_text())
    assert results["train"]["epochs_completed"] == 1
    assert set(results["eval"]["last"]["attacks"]) == {"clean", "pgd20", "cw20", "autoattack_lite"}
    hydra_cfg = yaml.safe_load((results_path.parent / ".hydra" / "hydra.yaml").read_text())["hydra"]
    (main,) = [s for s in hydra_cfg["runtime"]["config_sources"] if s["provider"] == "main"]
    assert main["path"].removeprefix("file://") == str(site / "robust_train" / "conf")
