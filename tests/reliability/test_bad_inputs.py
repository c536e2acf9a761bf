"""At least 30 distinct bad inputs through the real entry points: one clear message and the exit code.

In-process (`train_main`/`eval_main` with a patched sys.argv; subprocesses would take minutes for
this many cases). User errors exit 2 with `robust-train: error: <message>` and no traceback. Malformed
overrides exit 1 with Hydra's message; unknown keys, groups and group options exit 2 with one line and
the closest names.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from robust_train.builders import model_from_config
from robust_train.cli import eval_main, train_main
from robust_train.tracking.checkpoint import checksum_path, save_checkpoint

BASE = ["debug=fast", "logger=none", "trainer.progress=false"]

# (overrides, exit code, fragments the message must contain)
TRAIN_CASES: list[tuple[list[str], int, list[str]]] = [
    (["threat.eps=-0.1"], 2, ["threat.eps=-0.1", "out of range"]),
    (["threat.eps=abc"], 2, ["threat.eps='abc' is not a number"]),
    (["threat.eps=true"], 2, ["threat.eps=True is not a number"]),
    (["threat.norm=l3"], 2, ["threat.norm", "linf, l2"]),
    (["defense.attack.steps=ten"], 2, ["defense.attack.steps='ten' is not a number"]),
    (["defense.attack.steps=2.5"], 2, ["defense.attack.steps=2.5 must be an integer"]),
    (["trainer.epochs=0"], 2, ["trainer.epochs=0 is out of range"]),
    (["trainer.epochs=abc"], 2, ["trainer.epochs='abc' is not a number"]),
    (["trainer.batch_size=-4"], 2, ["trainer.batch_size=-4"]),
    (["trainer.optimizer.lr=0"], 2, ["trainer.optimizer.lr=0", "0 < value"]),
    (["trainer.validation.every=0"], 2, ["trainer.validation.every=0"]),
    (["seed=-1"], 2, ["seed=-1"]),
    (["defense=trades", "defense.beta=1e9"], 2, ["defense.beta=1000000000.0", "<= 100"]),
    (["defense=trades", "defense.beta=-1"], 2, ["defense.beta=-1"]),
    (["defense=awp", "defense.awp.gamma=5"], 2, ["defense.awp.gamma=5"]),
    (["addons=[sat]", "addons.sat.lam=1e6"], 2, ["addons.sat.lam", "divergence guard"]),
    (["addons=[lad]", "addons.lad.eta=1e9"], 2, ["addons.lad.eta", "divergence guard"]),
    (["addons=[iseat]", "addons.iseat.gamma=[5.0]"], 2, ["addons.iseat.gamma", "divergence guard"]),
    (["addons=[sat]", "defense=standard"], 2, ["addons=[sat] does not compose with defense=standard"]),
    (["addons=[iseat]", "defense=awp"], 2, ["addons=[iseat] cannot run with defense.awp.enabled=true"]),
    (["trainer.nan.policy=ignore"], 2, ["trainer.nan.policy='ignore'", "stop, skip"]),
    (["trainer.nan.max_skips=-1"], 2, ["trainer.nan.max_skips=-1"]),
    (["trainer.nan.max_term=0"], 2, ["trainer.nan.max_term=0"]),
    (["trainer.stop_signals=[SIGKILL]"], 2, ["trainer.stop_signals", "SIGKILL", "cannot be caught"]),
    (["trainer.resume=maybe"], 2, ["trainer.resume='maybe' must be true or false"]),
    (["eval.sanity.max_dead_grad_frac=2"], 2, ["eval.sanity.max_dead_grad_frac=2", "<= 1"]),
    (["eval.sanity.enabled=yes"], 2, ["eval.sanity.enabled='yes' must be true or false"]),
    (["+eval.sanity.bogus=1"], 2, ["eval.sanity.bogus is not a known key"]),
    (["+trainer.nan.policyy=skip"], 2, ["trainer.nan.policyy is not a known key"]),
    (["eval.checkpoints=[middle]"], 2, ["eval.checkpoints", "best, last"]),
    (["device=tpu:0"], 2, ["device='tpu:0'"]),
    (["logger=wandb", "logger.mode=sometimes"], 2, ["logger.mode='sometimes'", "offline"]),
    (["dataset=synthetic", "dataset.image_shape=[3,8,8]", "model=vgg16_bn"], 2,
     ["model=vgg16_bn cannot take dataset=synthetic images of shape [3, 8, 8]"]),
    (["dataset=synthetic", "dataset.mean=[0.5]"], 2, ["dataset.mean has 1 values", "3 channels"]),
    (["dataset=synthetic", "dataset.image_shape=[3,32]"], 2, ["dataset.image_shape=[3, 32]"]),
    (["threat.norm=l2", "threat.eps=0.5", "eval=full"], 2,
     ["eval.attacks.lafeat: lafeat is an L-inf attack but threat.norm='l2'"]),
    (["trainer.epochz=3"], 2, ["trainer.epochz is not a known key", "did you mean `trainer.epochs`?"]),
    (["model=resnet1000"], 2, ["model", "resnet1000", "preact_resnet18"]),
    (["addons=[nope]"], 2, ["nope"]),
    # Hydra's grammar errors: exit 1 and Hydra's message.
    (["trainer.epochs=[1,"], 1, ["no viable alternative at input '[1,'", "override_grammar"]),
    (["trainer.epochs"], 1, ["trainer.epochs"]),
]  # fmt: skip


@pytest.mark.parametrize("overrides,code,fragments", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_bad_train_input(cli, overrides, code, fragments, tmp_path, capsys, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    got, text = cli(train_main, "robust-train", [*BASE, *overrides, f"hydra.run.dir={run_dir}"])
    assert got == code, text
    assert "Traceback" not in text, text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    if code == 2:
        errors = [line for line in text.splitlines() if line.startswith("robust-train: error:")]
        assert len(errors) == 1, text
    assert not (run_dir / "last.pt").exists()  # refused before any work


def _checkpoint(compose, path: Path, **config_changes) -> Path:
    """A small but real checkpoint of the debug=fast model, with the config it claims to come from."""
    cfg = compose(BASE)
    config = OmegaConf.to_container(cfg, resolve=True)
    for dotted, value in config_changes.items():
        group, key = dotted.split("__")
        config[group][key] = value
    model = model_from_config(cfg.model, num_classes=10, mean=[0.1307] * 3, std=[0.3081] * 3)
    state = {
        "config": config, "epoch": 1, "model": model.state_dict(), "num_classes": 10,
        "mean": [0.1307] * 3, "std": [0.3081] * 3, "image_shape": [3, 32, 32],
    }  # fmt: skip
    save_checkpoint(state, path)
    return path


def test_resume_from_another_architecture_is_refused(cli, compose, tmp_path, capsys, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    _checkpoint(compose, run_dir / "last.pt", model__name="resnet18")
    code, text = cli(train_main, "robust-train", [*BASE, f"hydra.run.dir={run_dir}"])
    assert code == 2 and "model.name='resnet18'" in text and "preact_resnet18" in text, text


def test_results_file_of_another_version_is_refused(cli, compose, tmp_path, capsys, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    _checkpoint(compose, run_dir / "last.pt")
    (run_dir / "results.json").write_text(json.dumps({"format": "robust-train-results", "version": 0}))
    code, text = cli(train_main, "robust-train", [*BASE, f"hydra.run.dir={run_dir}"])
    assert code == 2 and "results format version 0" in text and "reads versions 1, 2" in text, text


@pytest.mark.parametrize("kind", ["missing", "absent", "truncated", "corrupt", "foreign", "architecture"])
def test_bad_checkpoint_for_eval(cli, kind, compose, tmp_path, capsys, monkeypatch) -> None:
    args = ["logger=none", f"hydra.run.dir={tmp_path / 'eval'}", "eval=quick", "eval.n_examples=4"]
    path = tmp_path / "ckpt.pt"
    expected = {
        "missing": "checkpoint is required",
        "absent": "does not exist",
        "truncated": "unreadable (truncated",
        "corrupt": "SHA-256 does not match",
        "foreign": "not a robust-train checkpoint",
        "architecture": "weights do not fit model",
    }[kind]
    if kind != "absent":
        _checkpoint(compose, path)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:2000])
    elif kind == "corrupt":
        checksum_path(path).write_text("0" * 64 + "  ckpt.pt\n")
    elif kind == "foreign":
        torch.save({"state_dict": {}}, path)
        checksum_path(path).unlink()
    elif kind == "architecture":
        args.append("model.name=resnet18")
    if kind != "missing":
        args.append(f"checkpoint={path}")
    code, text = cli(eval_main, "robust-eval", args)
    assert code == 2 and expected in text and "Traceback" not in text, text
