"""robust-export: our checkpoints in RobustBench's model-zoo layout with a model card, and back.

The round trip trains a tiny CIFAR-10-shaped run (debug=fast on CIFAR-10 pickles written here), exports
it, and evaluates the export through robust-eval's model_zoo path: the numbers equal those of robust-eval
on the original checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from robust_train.cli import eval_main, export_main, train_main
from robust_train.io import sha256_file
from robust_train.tracking.checkpoint import load_checkpoint, save_checkpoint
from robust_train.zoo import MODEL_INFO_FIELDS, export_model

NAME = "Ours2026_PRN18"


def write_cifar10(root: Path, per_batch: int = 8, n_test: int = 8) -> None:
    """<root>/cifar-10-batches-py in torchvision's layout, random images and labels."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*((f"data_batch_{b + 1}", per_batch) for b in range(5)), ("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"labels": [int(v) for v in rng.integers(0, 10, n)], "data": data}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f, protocol=2)


def invoke(main, prog: str, argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", [prog, *argv])
    GlobalHydra.instance().clear()
    code = 0
    try:
        main() if prog != "robust-export" else main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def data_args(root: Path) -> list[str]:
    return [f"dataset.root={root}", "dataset.download=false", "+dataset.check_integrity=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained run on CIFAR-10 pickles, evaluated with clean, PGD-20 and AutoAttack-lite."""
    base = tmp_path_factory.mktemp("export")
    write_cifar10(base / "data")
    run = base / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(
        sys,
        "argv",
        [
            "robust-train",
            "debug=fast",
            "dataset=cifar10",
            f"dataset.root={base / 'data'}",
            "dataset.download=false",
            "dataset.check_integrity=false",
            "dataset.val_size=4",
            "dataset.test_limit=8",
            "defense=standard",
            "eval=quick",
            "+attack@eval.attacks.autoattack_lite=autoattack_lite",
            "eval.n_examples=8",
            "logger=none",
            f"hydra.run.dir={run}",
        ],
    )
    GlobalHydra.instance().clear()
    try:
        train_main()
    finally:
        mp.undo()
    assert (run / "best.pt").is_file() and (run / "results.json").is_file()
    return {"base": base, "data": base / "data", "run": run}


def test_round_trip_export_then_robustbench_eval(trained, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "models"
    code, text = invoke(
        export_main,
        "robust-export",
        [str(trained["run"]), "--out", str(out), "--name", NAME, "--authors", "A. Author"],
        capsys,
        monkeypatch,
    )
    assert code == 0, text
    pt, card_path = out / "cifar10" / "Linf" / f"{NAME}.pt", out / "cifar10" / "Linf" / f"{NAME}.json"
    assert pt.is_file() and card_path.is_file()
    # RobustBench's file format: {'state_dict': ...}, loadable with weights_only, our keys without prefix.
    saved = torch.load(pt, weights_only=True)
    state = load_checkpoint(trained["run"] / "best.pt")
    assert list(saved) == ["state_dict"] and set(saved["state_dict"]) == set(state["model"])
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in state["model"].items())
    # The normalization lives in the architecture (non-persistent buffers), the card states it.
    assert not any("normalize" in k or k in ("mu", "sigma", "mean", "std") for k in saved["state_dict"])
    card = json.loads(card_path.read_text())
    assert [k for k in card if k != "robust_train"] == list(MODEL_INFO_FIELDS)
    results = json.loads((trained["run"] / "results.json").read_text())
    best = results["eval"]["best"]["attacks"]
    assert card["clean_acc"] == f"{best['clean']['accuracy']:.2f}"
    assert card["autoattack_acc"] == f"{best['autoattack_lite']['accuracy']:.2f}" == card["reported"]
    assert card["eps"] == "8/255" and card["dataset"] == "cifar10" and card["authors"] == "A. Author"
    assert card["architecture"] == "PreActResNet-18 (width x0.0625)" and card["additional_data"] is False
    assert "AutoAttack lite" in card["footnote"] and "first 8 test images" in card["footnote"]
    block = card["robust_train"]
    assert block["model"]["name"] == "preact_resnet18" and block["preprocessing"]["normalize"] == "meanstd"
    assert block["sha256"] == sha256_file(pt) and block["source_sha256"] == sha256_file(
        trained["run"] / "best.pt"
    )
    assert "robust-export: warning: the AutoAttack number is the lite version" in text

    common = [
        *data_args(trained["data"]),
        "dataset.test_limit=8",
        "eval=quick",
        "eval.n_examples=8",
        "logger=none",
    ]
    code, text = invoke(
        eval_main,
        "robust-eval",
        [f"checkpoint={trained['run'] / 'best.pt'}", *common, f"hydra.run.dir={tmp_path / 'eval_ours'}"],
        capsys,
        monkeypatch,
    )
    assert code == 0, text
    code, text = invoke(
        eval_main,
        "robust-eval",
        [f"model_zoo.name={NAME}", f"model_zoo.dir={out}", *common, f"hydra.run.dir={tmp_path / 'eval_zoo'}"],
        capsys,
        monkeypatch,
    )
    assert code == 0, text
    ours = json.loads((tmp_path / "eval_ours" / "results.json").read_text())
    theirs = json.loads((tmp_path / "eval_zoo" / "results.json").read_text())
    assert (
        theirs["model"]["zoo"]["described_by"] == "card"
        and theirs["model"]["architecture"] == "preact_resnet18"
    )
    assert ours["model"]["source"] == "robust-train" and ours["model"]["sha256"] == block["source_sha256"]
    a, b = ours["eval"]["best"]["attacks"], theirs["eval"]["robustbench"]["attacks"]
    assert a["clean"]["accuracy"] == b["clean"]["accuracy"] == best["clean"]["accuracy"]
    assert a["pgd20"]["accuracy"] == b["pgd20"]["accuracy"]


def test_export_refuses_results_without_autoattack(trained, tmp_path, capsys, monkeypatch) -> None:
    eval_dir = tmp_path / "eval"
    code, text = invoke(
        eval_main,
        "robust-eval",
        [
            f"checkpoint={trained['run'] / 'best.pt'}",
            *data_args(trained["data"]),
            "eval=quick",
            "eval.n_examples=8",
            "logger=none",
            f"hydra.run.dir={eval_dir}",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, text
    argv = [
        str(trained["run"] / "best.pt"),
        "--out",
        str(tmp_path / "m"),
        "--results",
        str(eval_dir / "results.json"),
    ]
    code, text = invoke(export_main, "robust-export", argv, capsys, monkeypatch)
    assert (
        code == 2
        and "has no AutoAttack accuracy at linf eps 0.0313725" in text
        and "--allow-missing-aa" in text
    )
    assert not (tmp_path / "m").exists()
    code, text = invoke(export_main, "robust-export", [*argv, "--allow-missing-aa"], capsys, monkeypatch)
    assert code == 0, text
    card = json.loads(next((tmp_path / "m").rglob("*.json")).read_text())
    assert card["autoattack_acc"] == "" and card["robust_train"]["autoattack"] is None
    # Numbers of one file are not another's: robust-eval's results name best.pt's SHA-256.
    state = load_checkpoint(trained["run"] / "best.pt")
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    other = tmp_path / "other" / "best.pt"
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, other)
    argv[0] = str(other)
    code, text = invoke(export_main, "robust-export", [*argv, "--allow-missing-aa"], capsys, monkeypatch)
    assert code == 2 and "its numbers are not this file's" in text, text


def _copy_run(trained, tmp_path: Path, change) -> Path:
    """The trained run copied, its best.pt config and results.json edited by `change(state, results)`."""
    run = tmp_path / "run"
    run.mkdir()
    state = load_checkpoint(trained["run"] / "best.pt")
    results = json.loads((trained["run"] / "results.json").read_text())
    results["eval"]["best"]["checkpoint"] = str(run / "best.pt")
    change(state, results)
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, run / "best.pt")
    (run / "results.json").write_text(json.dumps(results))
    return run


@pytest.mark.parametrize("case", ["mnist", "sanity", "no_clean", "lad_noise", "bad_name"])
def test_export_refusals(case, trained, tmp_path, capsys, monkeypatch) -> None:
    def change(state, results):
        entry = results["eval"]["best"]
        if case == "mnist":
            state["config"]["dataset"]["name"] = "mnist5k"
        elif case == "sanity":
            entry["sanity"] = {"failed": ["huge_eps"], "warnings": [], "checks": {}}
        elif case == "no_clean":
            del entry["attacks"]["clean"]
        elif case == "lad_noise":
            state["config"]["addons"] = {"lad": {"enabled": True, "noise": {"enabled": True}}}

    run = _copy_run(trained, tmp_path, change)
    argv = [str(run), "--out", str(tmp_path / "m"), *(["--name", "a/b"] if case == "bad_name" else [])]
    code, text = invoke(export_main, "robust-export", argv, capsys, monkeypatch)
    expected = {
        "mnist": "dataset 'mnist5k' has no RobustBench leaderboard",
        "sanity": "failed its sanity checks (huge_eps)",
        "no_clean": "has no clean accuracy",
        "lad_noise": "add-on `lad` changes how the model predicts at evaluation",
        "bad_name": "--name 'a/b' must be a file name",
    }[case]
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("robust-export: error: "), text
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "m").exists()
    if case == "sanity":  # an explicit override exports, with the reason on stderr
        result = export_model(run, tmp_path / "m", allow_failed_sanity=True)
        assert result.checkpoint.is_file() and "failed its sanity checks" in result.warnings[0]


def test_export_of_a_checkpoint_file_and_kind(trained, tmp_path) -> None:
    result = export_model(trained["run"] / "last.pt", tmp_path / "m")
    assert result.checkpoint == tmp_path / "m" / "cifar10" / "Linf" / "run_last.pt"
    assert (
        result.card_data["robust_train"]["epoch"]
        == json.loads((trained["run"] / "results.json").read_text())["eval"]["last"]["epoch"]
    )
    shutil.rmtree(tmp_path / "m")
    result = export_model(trained["run"], tmp_path / "m", kind="last", name="x")
    assert result.checkpoint.name == "x.pt" and result.card_data["robust_train"]["weights"] == "trained"


def test_export_takes_the_weights_the_results_evaluated(trained, tmp_path) -> None:
    """best.pt of an EMA run is evaluated (and so exported) with the averaged weights."""
    averaged: dict[str, torch.Tensor] = {}

    def change(state, results):
        params = [k for k, v in state["model"].items() if v.is_floating_point() and "running" not in k]
        averaged.update({k: state["model"][k] * 0.5 for k in params})
        state["ema"] = {"tensors": averaged, "updates": 3}
        state["eval_weights"] = "ema"
        results["eval"]["best"]["weights"] = "ema"

    run = _copy_run(trained, tmp_path, change)
    result = export_model(run, tmp_path / "m")
    saved = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    assert result.card_data["robust_train"]["weights"] == "ema"
    assert all(torch.equal(saved[k], v) for k, v in averaged.items())
