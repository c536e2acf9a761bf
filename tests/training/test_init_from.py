"""`model.init_from=<file>` (robust_train/models/init.py): a training run starts from someone's weights.

Every file is written here in its real on-disk format: a plain state_dict, a RobustBench zoo file in
`<dir>/cifar10/Linf/<name>.pt` with `{'state_dict': {'module.' + key: ...}}`, and our own checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from robust_train.builders import model_from_config
from robust_train.commands.train import train_run
from robust_train.data import build_dataset
from robust_train.errors import CheckpointError
from robust_train.models import build_model
from robust_train.models.init import initialize_from
from robust_train.tracking.checkpoint import load_checkpoint
from robust_train.training.trainer import Trainer

FAST = [
    "debug=fast", "logger=none", "trainer.progress=false", "eval=quick", "eval.n_examples=8",
    "eval.sanity.enabled=false", "dataset.train_limit=64", "trainer.batch_size=16",
    "trainer.max_batches=2", "trainer.validation.pgd_steps=1", "trainer.validation.max_examples=16",
    "defense.attack.steps=1",
]  # fmt: skip
MNIST_MEAN, MNIST_STD = (0.1307,) * 3, (0.3081,) * 3
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_weights(
    name: str, width: float = 0.0625, seed: int = 7, **options: Any
) -> dict[str, torch.Tensor]:
    """A state_dict of `name` unlike any fresh initialization (BN statistics included)."""
    torch.manual_seed(seed)
    model = build_model(name, 10, MNIST_MEAN, MNIST_STD, width=width, **options)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.01 * torch.randn_like(t))
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def weights_at_fit(monkeypatch) -> list[dict[str, Any]]:
    """The model's weights (and the EMA's, when on) at the moment training starts, per train_run call."""
    seen: list[dict[str, Any]] = []
    fit = Trainer.fit

    def spy(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        ema = getattr(self, "ema", None)
        seen.append({
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "ema": None if ema is None else {k: v.detach().clone() for k, v in ema.weights().items()},
            "epoch": self.epoch,
        })  # fmt: skip
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", spy)
    return seen


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    expected = {k: v for k, v in expected.items() if k in actual}
    assert set(actual) == set(expected) | {k for k in actual if k.endswith("num_batches_tracked")}
    for key, value in expected.items():
        assert torch.equal(actual[key].cpu(), value.cpu()), key


# ----------------------------------------------------------------------------- plain and foreign files


def test_a_run_starts_from_exactly_the_weights_of_a_plain_state_dict(
    compose, tmp_path, weights_at_fit
) -> None:
    source = random_weights("preact_resnet18")
    path = tmp_path / "weights.pt"
    torch.save(source, path)
    run = tmp_path / "run"
    results = train_run(compose([*FAST, f"model.init_from={path}", "ema.enabled=true"]), run)
    start = weights_at_fit[0]
    assert start["epoch"] == 0
    assert_same_weights(start["model"], source)
    assert_same_weights(start["ema"], source)  # the average starts from them too
    # Only the weights: the optimizer, the epoch and the schedule start fresh.
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1
    record = state["init_from"]
    assert record["path"] == str(path.resolve()) and record["sha256"] == sha256(path)
    assert record["kind"] == "state_dict" and record["weights"] is None
    # results.json's config (the W&B config): the path as given and the file's SHA-256.
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["config"]["model"]["init_from"] == str(path)
    assert on_disk["config"]["model"]["init_from_sha256"] == sha256(path)
    assert results["config"]["model"]["init_from_sha256"] == sha256(path)


def _robustbench_file(root: Path, name: str, state_dict: dict[str, torch.Tensor]) -> Path:
    """RobustBench's zoo layout: <model_dir>/cifar10/Linf/<name>.pt, {'state_dict': DataParallel keys}."""
    path = root / "models" / "cifar10" / "Linf" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    return path


def test_a_robustbench_file_initializes_where_dropping_it_in_as_last_pt_fails(
    compose, tmp_path, weights_at_fit
) -> None:
    # Wang2023Better_WRN-28-10 is a DMWideResNet normalizing with the DM code's CIFAR-10 statistics:
    # model.stats=cifar10 gives the same normalization on any dataset.
    arch = ["model=wrn28_10_silu", "model.stats=cifar10"]
    source = random_weights("wrn28_10_silu", stats="cifar10")
    path = _robustbench_file(tmp_path, "Wang2023Better_WRN-28-10", source)
    # The old route: a foreign file as last.pt is no checkpoint of ours.
    dropped = tmp_path / "dropped"
    dropped.mkdir()
    (dropped / "last.pt").write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="not a robust-train checkpoint"):
        train_run(compose([*FAST, *arch]), dropped)
    run = tmp_path / "run"
    train_run(compose([*FAST, *arch, f"model.init_from={path}"]), run)
    assert_same_weights(weights_at_fit[-1]["model"], source)
    record = load_checkpoint(run / "last.pt")["init_from"]
    assert record["kind"] == "robustbench" and record["sha256"] == sha256(path)
    assert record["source"] == {
        "name": "Wang2023Better_WRN-28-10",
        "dataset": "cifar10",
        "threat_model": "Linf",
    }


def test_a_resumed_run_continues_from_last_pt_not_from_init_from(compose, tmp_path, weights_at_fit) -> None:
    path = tmp_path / "weights.pt"
    torch.save(random_weights("preact_resnet18"), path)
    started_from = sha256(path)
    run = tmp_path / "run"
    train_run(compose([*FAST, f"model.init_from={path}", "trainer.epochs=1"]), run)
    after_one = load_checkpoint(run / "last.pt")["model"]
    torch.save(random_weights("preact_resnet18", seed=99), path)  # the file changes meanwhile
    results = train_run(compose([*FAST, f"model.init_from={path}", "trainer.epochs=2"]), run)
    resumed = weights_at_fit[-1]
    assert resumed["epoch"] == 1
    assert_same_weights(resumed["model"], after_one)
    # The origin recorded is the file the run started from, not what the path holds now.
    assert load_checkpoint(run / "last.pt")["init_from"]["sha256"] == started_from != sha256(path)
    assert results["config"]["model"]["init_from_sha256"] == started_from


# ----------------------------------------------------------------------------- our checkpoints


def test_our_checkpoints_last_and_the_averaged_weights_of_best_and_ema(
    compose, tmp_path, weights_at_fit
) -> None:
    first = tmp_path / "first"
    train_run(compose([*FAST, "ema.enabled=true", "ema.decay=0.5"]), first)
    last = load_checkpoint(first / "last.pt")
    ema_pt = load_checkpoint(first / "ema.pt")
    for name, expected, which in (("last.pt", last["model"], "trained"), ("ema.pt", ema_pt["model"], "ema")):
        run = tmp_path / f"from_{name}"
        train_run(compose([*FAST, f"model.init_from={first / name}"]), run)
        assert_same_weights(weights_at_fit[-1]["model"], expected)
        record = load_checkpoint(run / "last.pt")["init_from"]
        assert record["kind"] == "robust-train" and record["weights"] == which
        assert record["source"] == {"model": "preact_resnet18", "epoch": 1}
    # The averaged weights differ from the trained ones (decay 0.5 over the steps run).
    assert any(not torch.equal(last["model"][k], ema_pt["model"][k]) for k in last["model"])


# ----------------------------------------------------------------------------- refusals


def _init(compose, overrides: list[str]) -> None:
    """Build the run's model and call init_from on it, as train_run does."""
    cfg = compose([*FAST, *overrides])
    data = build_dataset(cfg.dataset, 0)
    model = model_from_config(cfg.model, data)
    initialize_from(cfg.model, model, None, {"model": {}})


def test_refusals_name_the_first_mismatches_in_one_line(compose, tmp_path) -> None:
    wider = tmp_path / "wider.pt"
    torch.save(random_weights("preact_resnet18", width=0.125), wider)
    other = tmp_path / "resnet.pt"
    torch.save(random_weights("resnet18"), other)
    shapes = (
        r"model\.init_from=.*wider\.pt: weights do not fit model 'preact_resnet18'.*shape mismatch: "
        r"conv1\.weight \(checkpoint \(8, 3, 3, 3\), model \(4, 3, 3, 3\)\)"
    )
    cases = [
        (wider, shapes),
        (other, r"missing keys: .*; unexpected keys: "),
        (tmp_path / "absent.pt", r"model\.init_from=.*absent\.pt does not exist"),
    ]
    for path, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern) as info:
            _init(compose, [f"model.init_from={path}"])
        assert "\n" not in str(info.value)


def test_refuses_weights_trained_with_another_input_normalization(compose, tmp_path) -> None:
    # A file that carries its normalization (RobustBench's Wong2020Fast/Rice2020 classes keep mu/sigma as
    # persistent buffers): CIFAR-10 statistics, but this run's model normalizes with MNIST's.
    with_buffers = random_weights("preact_resnet18")
    with_buffers["mu"] = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    with_buffers["sigma"] = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    path = tmp_path / "normalized.pt"
    torch.save(with_buffers, path)
    message = (
        r"trained with \(x - mean\) / std with mean=\[0\.4914.*\(its mu/sigma buffers\), but this model "
        r"applies \(x - mean\) / std with mean=\[0\.1307"
    )
    with pytest.raises(CheckpointError, match=message):
        _init(compose, [f"model.init_from={path}"])
    with pytest.raises(CheckpointError, match=r"but this model applies no normalization"):
        _init(compose, [f"model.init_from={path}", "model.normalize=none"])
    # A RobustBench file whose definition is known: Wang2023Better normalizes with CIFAR-10's statistics.
    rb = _robustbench_file(tmp_path, "Wang2023Better_WRN-28-10", random_weights("wrn28_10_silu"))
    with pytest.raises(CheckpointError, match=r"\(RobustBench's definition of Wang2023Better_WRN-28-10\)"):
        _init(compose, [f"model.init_from={rb}", "model=wrn28_10_silu"])
    _init(compose, [f"model.init_from={rb}", "model=wrn28_10_silu", "model.stats=cifar10"])


def test_refuses_our_checkpoint_of_another_normalization(compose, tmp_path) -> None:
    first = tmp_path / "first"
    train_run(compose([*FAST, "model.normalize=none"]), first)
    with pytest.raises(CheckpointError, match=r"no normalization \(raw \[0, 1\] pixels\) \(its run config\)"):
        _init(compose, [f"model.init_from={first / 'last.pt'}"])
    _init(compose, [f"model.init_from={first / 'last.pt'}", "model.normalize=none"])


def test_schema_and_builder(compose) -> None:
    from robust_train.config import validate_train_config
    from robust_train.errors import ConfigError

    cfg = compose([*FAST, "model.init_from=/some/file.pt"])
    validate_train_config(cfg)  # a path; checked when the run loads it
    assert cfg.model.init_from == "/some/file.pt"
    with pytest.raises(ConfigError, match=r"did you mean `model\.init_from`"):
        validate_train_config(compose([*FAST, "+model.init_frm=/x.pt"]))
    # Not an architecture option: the builder never receives it.
    build_model("preact_resnet18", 10, MNIST_MEAN, MNIST_STD, width=0.0625, init_from="/x.pt")
