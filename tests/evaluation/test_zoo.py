"""Other people's weights: RobustBench model-zoo files and plain state_dicts, read and evaluated.

Every file is written here in its real on-disk format: the zoo layout `<dir>/<dataset>/<threat_model>/
<name>.pt` holding `{'state_dict': ...}` / `{'model_state_dict': ...}` with DataParallel's `module.` prefix,
tiny CIFAR-10 pickles in torchvision's layout. Nothing is downloaded.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from robust_train import zoo
from robust_train.cli import eval_main
from robust_train.errors import CheckpointError, ConfigError
from robust_train.io import sha256_file
from robust_train.models import build_model
from robust_train.tracking.checkpoint import save_checkpoint

WIDTH = 0.0625


# ------------------------------------------------------------------------------------------------ helpers
def write_cifar10(root: Path, test_x: np.ndarray, test_y: np.ndarray, per_batch: int = 4) -> None:
    """<root>/cifar-10-batches-py in torchvision's layout (rows: 1024 R, 1024 G, 1024 B)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    for b in range(5):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        dump(
            f"data_batch_{b + 1}", {"labels": [int(v) for v in rng.integers(0, 10, per_batch)], "data": data}
        )
    dump("test_batch", {"labels": [int(v) for v in test_y], "data": test_x.reshape(len(test_y), 3072)})
    dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval-mode model with non-trivial BN statistics, so that its predictions vary across images."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)
    return model.eval()


def random_test_images(n: int = 8, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def predictions(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x).float() / 255).argmax(1).numpy()


def write_zoo_file(
    model_dir: Path,
    name: str,
    state_dict: dict,
    threat_model: str = "Linf",
    container: str | None = "state_dict",
    prefix: str = "module.",
) -> Path:
    path = zoo.zoo_path(model_dir, "cifar10", threat_model, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = {f"{prefix}{k}": v for k, v in state_dict.items()}
    torch.save(weights if container is None else {container: weights, "epoch": 99}, path)
    return path


def run_eval(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["robust-eval", *argv])
    GlobalHydra.instance().clear()
    code = 0
    try:
        eval_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out + out.err


def data_args(root: Path) -> list[str]:
    return [f"dataset.root={root}", "dataset.download=false", "+dataset.check_integrity=false"]


# ------------------------------------------------------------ the table against RobustBench's key layout
def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


def rb_wide_resnet(depth: int, widen: int, sub_block1: bool) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of RobustBench's (TRADES) WideResNet(depth, widen_factor, sub_block1)."""
    n, ch = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (16, 3, 3, 3)}
    stages = [
        ("block1", 16, ch[1]),
        *([("sub_block1", 16, ch[1])] if sub_block1 else []),
        ("block2", ch[1], ch[2]),
        ("block3", ch[2], ch[3]),
    ]
    for name, c_in, c_out in stages:
        for i in range(n):
            p, c = f"{name}.layer.{i}", c_in if i == 0 else c_out
            keys |= _bn(f"{p}.bn1", c) | {f"{p}.conv1.weight": (c_out, c, 3, 3)}
            keys |= _bn(f"{p}.bn2", c_out) | {f"{p}.conv2.weight": (c_out, c_out, 3, 3)}
            if c != c_out:
                keys[f"{p}.convShortcut.weight"] = (c_out, c, 1, 1)
    return keys | _bn("bn1", ch[3]) | {"fc.weight": (10, ch[3]), "fc.bias": (10,)}


def rb_dm_wide_resnet(depth: int, width: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of RobustBench's DMWideResNet(depth, width)."""
    n, ch = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
    keys: dict[str, tuple[int, ...]] = {"init_conv.weight": (16, 3, 3, 3)}
    for g in range(3):
        for i in range(n):
            p, c = f"layer.{g}.block.{i}", ch[g] if i == 0 else ch[g + 1]
            keys |= _bn(f"{p}.batchnorm_0", c) | {f"{p}.conv_0.weight": (ch[g + 1], c, 3, 3)}
            keys |= _bn(f"{p}.batchnorm_1", ch[g + 1]) | {f"{p}.conv_1.weight": (ch[g + 1], ch[g + 1], 3, 3)}
            if c != ch[g + 1]:
                keys[f"{p}.shortcut.weight"] = (ch[g + 1], c, 1, 1)
    return keys | _bn("batchnorm", ch[3]) | {"logits.weight": (10, ch[3]), "logits.bias": (10,)}


def rb_preact_resnet18(bn_before_fc: bool) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of RobustBench's PreActResNet(PreActBlock(V2), [2, 2, 2, 2], bn_before_fc)."""
    keys: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 3, 3)}
    c_in = 64
    for s, planes in enumerate((64, 128, 256, 512), start=1):
        for i in range(2):
            p = f"layer{s}.{i}"
            keys |= _bn(f"{p}.bn1", c_in) | {f"{p}.conv1.weight": (planes, c_in, 3, 3)}
            keys |= _bn(f"{p}.bn2", planes) | {f"{p}.conv2.weight": (planes, planes, 3, 3)}
            if c_in != planes:
                keys[f"{p}.shortcut.0.weight"] = (planes, c_in, 1, 1)
            c_in = planes
    return (
        keys | (_bn("bn", 512) if bn_before_fc else {}) | {"linear.weight": (10, 512), "linear.bias": (10,)}
    )


def rb_layout(entry: zoo.ZooEntry) -> dict[str, tuple[int, ...]]:
    ref = entry.reference
    if ref.startswith("DMWideResNet"):
        depth, width = map(int, re.findall(r"depth=(\d+), width=(\d+)", ref)[0])
        return rb_dm_wide_resnet(depth, width)
    if "PreActResNet" in ref:
        return rb_preact_resnet18("bn_before_fc=True" in ref)
    depth, widen = map(int, re.findall(r"depth=(\d+), widen_factor=(\d+)", ref)[0])
    return rb_wide_resnet(depth, widen, "sub_block1=True" in ref)


@pytest.mark.parametrize("entry", zoo.ZOO_ENTRIES, ids=lambda e: f"{e.name}-{'-'.join(e.threat_models)}")
def test_zoo_entry_takes_robustbench_layout(entry: zoo.ZooEntry) -> None:
    """RobustBench's full-width keys and shapes fit the mapped architecture (built on the meta device)."""
    with torch.device("meta"):
        model = build_model(
            entry.architecture,
            10,
            entry.mean or (0.5,) * 3,
            entry.std or (0.25,) * 3,
            normalize=entry.normalize,
            **entry.options,
        )
    theirs = {k: torch.empty(shape, device="meta") for k, shape in rb_layout(entry).items()}
    fitted, _ = zoo.fit_state_dict(theirs, model.state_dict().keys())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in fitted.items()} == ours


@pytest.mark.parametrize("entry", zoo.ZOO_ENTRIES, ids=lambda e: f"{e.name}-{'-'.join(e.threat_models)}")
def test_zoo_entry_preprocessing_matches_reference(entry: zoo.ZooEntry) -> None:
    """Normalizing classes (DMWideResNet, RobustBench's mu/sigma ones) map to meanstd, the rest to none."""
    normalizes = entry.reference.startswith("DMWideResNet") or zoo.RB_NORMALIZED in entry.reference
    assert entry.normalize == ("meanstd" if normalizes else "none")
    if normalizes:
        assert entry.mean == (0.4914, 0.4822, 0.4465) and entry.std == (0.2471, 0.2435, 0.2616)
    assert entry.dataset == "cifar10" and set(entry.threat_models) <= {"Linf", "L2"}


def test_required_zoo_names_are_supported() -> None:
    linf = zoo.zoo_names("cifar10", "Linf")
    for name in (
        "Wang2023Better_WRN-28-10",
        "Wang2023Better_WRN-70-16",
        "Wong2020Fast",
        "Rice2020Overfitting",
        "Zhang2019Theoretically",
        "Gowal2020Uncovering_34_20",
        "Chen2024Data_WRN_34_20",
    ):
        assert name in linf
    assert zoo.zoo_entry("Wong2020Fast", "cifar10", "Linf").architecture == "preact_resnet18_wong"
    assert zoo.zoo_entry("Rice2020Overfitting", "cifar10", "Linf").architecture == "wrn34_20"
    assert zoo.zoo_entry("Rice2020Overfitting", "cifar10", "L2").architecture == "preact_resnet18"
    assert zoo.zoo_entry("Zhang2019Theoretically", "cifar10", "Linf").normalize == "none"
    assert zoo.ZOO_EPS == {"Linf": 8 / 255, "L2": 0.5}


def test_unknown_zoo_name_lists_the_supported_ones() -> None:
    with pytest.raises(ConfigError) as err:
        zoo.zoo_entry("Wang2023Better_WRN28-10", "cifar10", "Linf")
    text = str(err.value)
    assert "\n" not in text and "did you mean `Wang2023Better_WRN-28-10`?" in text
    assert "Zhang2019Theoretically" in text and "Wong2020Fast" in text
    with pytest.raises(ConfigError, match="listed for model_zoo.threat_model=Linf"):
        zoo.zoo_entry("Wong2020Fast", "cifar10", "L2")


# ----------------------------------------------------------------------------------------- load_weights
@pytest.mark.parametrize("container", ["state_dict", "model_state_dict", None])
def test_load_weights_unwraps_and_strips(tmp_path, container) -> None:
    model = build_model("preact_resnet18", 10, (0.5,) * 3, (0.25,) * 3, width=WIDTH)
    path = write_zoo_file(tmp_path / "models", "Rice2020Overfitting", model.state_dict(), "L2", container)
    loaded = zoo.load_weights(path)
    assert loaded.kind == "robustbench" and set(loaded.state_dict) == set(model.state_dict())
    assert loaded.meta["container"] == container and loaded.meta["stripped_prefixes"] == ["module."]
    assert loaded.meta["zoo"] == {"name": "Rice2020Overfitting", "dataset": "cifar10", "threat_model": "L2"}
    assert loaded.meta["sha256"] == sha256_file(path) and loaded.meta["card"] is None
    plain = tmp_path / "weights.pt"
    torch.save({f"model.{k}": v for k, v in model.state_dict().items()}, plain)
    loaded = zoo.load_weights(plain)
    assert loaded.kind == "state_dict" and set(loaded.state_dict) == set(model.state_dict())
    assert loaded.meta["stripped_prefixes"] == ["model."]


def test_load_weights_reads_our_checkpoints(tmp_path) -> None:
    model = build_model("preact_resnet18", 10, (0.5,) * 3, (0.25,) * 3, width=WIDTH)
    path = tmp_path / "best.pt"
    save_checkpoint(
        {
            "config": {"model": {"name": "preact_resnet18"}},
            "epoch": 3,
            "model": model.state_dict(),
            "num_classes": 10,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
        },
        path,
    )
    loaded = zoo.load_weights(path)
    assert loaded.kind == "robust-train" and loaded.meta["weights"] == "trained" and loaded.meta["epoch"] == 3
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in model.state_dict().items())


def test_load_weights_takes_normalization_buffers_out(tmp_path) -> None:
    model = build_model("preact_resnet18_wong", 10, (0.5,) * 3, (0.25,) * 3, width=WIDTH)
    sd = dict(model.state_dict())
    sd["mu"] = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    sd["sigma"] = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)
    loaded = zoo.load_weights(write_zoo_file(tmp_path, "Wong2020Fast", sd))
    assert "mu" not in loaded.state_dict and loaded.meta["normalization"]["mu"] == pytest.approx(
        [0.4914, 0.4822, 0.4465]
    )
    zoo.load_into(model, loaded, "test")


def test_load_weights_allows_numpy_scalars_refuses_other_objects(tmp_path) -> None:
    model = build_model("preact_resnet18", 10, (0.5,) * 3, (0.25,) * 3, width=WIDTH)
    ok = tmp_path / "np.pt"
    torch.save({"state_dict": model.state_dict(), "best_acc": np.float64(0.5)}, ok)
    assert set(zoo.load_weights(ok).state_dict) == set(model.state_dict())
    bad = tmp_path / "ns.pt"
    torch.save({"state_dict": model.state_dict(), "args": _Args()}, bad)
    with pytest.raises(CheckpointError, match=r"pickled Python objects besides tensors \(.*_Args\)"):
        zoo.load_weights(bad)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 3, "acc": 0.5}, empty)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        zoo.load_weights(empty)


class _Args:  # stands for argparse.Namespace and the like, pickled by other tools' checkpoints
    pass


def test_fit_state_dict_renames_only_what_the_model_asks_for() -> None:
    ours = build_model("preact_resnet18", 10, (0.5,) * 3, (0.25,) * 3, width=WIDTH)
    theirs = {k.replace("fc.", "linear."): v for k, v in ours.state_dict().items()}
    fitted, changes = zoo.fit_state_dict(theirs, ours.state_dict().keys())
    assert set(fitted) == set(ours.state_dict()) and changes == ["renamed linear.* to fc.*"]
    wong = build_model("preact_resnet18_wong", 10, (0.5,) * 3, (0.25,) * 3, width=WIDTH)
    fitted, changes = zoo.fit_state_dict(wong.state_dict(), wong.state_dict().keys())
    assert changes == [] and set(fitted) == set(wong.state_dict())


# ----------------------------------------------------------------------- robust-eval, end to end (CLI)
def _dm_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("wrn28_10_silu", 10, zoo.CIFAR10_MEAN, zoo.CIFAR10_STD, width=WIDTH)
    return randomized(model)


def test_robustbench_checkpoint_evaluated_with_eval_default(tmp_path, capsys, monkeypatch) -> None:
    """Done-when: a RobustBench-format file written here is evaluated by robust-eval eval=default."""
    model = _dm_model()
    x = random_test_images()
    labels = predictions(model, x)
    unnormalized = build_model("wrn28_10_silu", 10, (0.0,) * 3, (1.0,) * 3, width=WIDTH, normalize="none")
    unnormalized.load_state_dict(model.state_dict())
    # The labels only a correctly preprocessed model predicts: 100% clean accuracy proves the preprocessing.
    assert (predictions(unnormalized.eval(), x) != labels).any()
    write_cifar10(tmp_path / "data", x, labels)
    path = write_zoo_file(
        tmp_path / "models", "Wang2023Better_WRN-28-10", model.state_dict(), container="model_state_dict"
    )
    out = tmp_path / "eval"
    code, text = run_eval(
        [
            "model_zoo.name=Wang2023Better_WRN-28-10",
            f"model_zoo.dir={tmp_path / 'models'}",
            f"model.width={WIDTH}",
            *data_args(tmp_path / "data"),
            "eval=default",
            "debug=fast",
            "logger=none",
            f"hydra.run.dir={out}",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, text
    results = json.loads((out / "results.json").read_text())
    identity = results["model"]
    assert identity["source"] == "robustbench" and identity["name"] == "Wang2023Better_WRN-28-10"
    assert identity["file"] == str(path) and identity["sha256"] == sha256_file(path)
    assert identity["architecture"] == "wrn28_10_silu" and identity["architecture_options"]["width"] == WIDTH
    assert identity["preprocessing"] == {
        "input": "[0, 1] RGB",
        "normalize": "meanstd",
        "mean": pytest.approx(list(zoo.CIFAR10_MEAN)),
        "std": pytest.approx(list(zoo.CIFAR10_STD)),
    }
    entry = results["eval"]["robustbench"]
    assert set(entry["attacks"]) == {"clean", "pgd20", "cw20", "autoattack_lite"}
    assert entry["attacks"]["clean"]["accuracy"] == 100.0 and entry["attacks"]["clean"]["n"] == len(x)
    assert entry["attacks"]["pgd20"]["attack"]["eps"] == pytest.approx(8 / 255)
    assert "weights" not in entry and "sanity" in entry
    assert {"defense", "trainer", "addons"}.isdisjoint(results["config"])
    lines = text.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("accuracy (%)"))
    identity_lines = [
        i for i, line in enumerate(lines) if line.startswith("model: robustbench Wang2023Better")
    ]
    assert (
        identity_lines
        and identity_lines[-1] < table
        and "(x - [0.4914, 0.4822, 0.4465])" in lines[identity_lines[-1]]
    )


def test_state_dict_with_stated_architecture_and_preprocessing(tmp_path, capsys, monkeypatch) -> None:
    torch.manual_seed(1)
    model = randomized(
        build_model("preact_resnet18", 10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), width=WIDTH)
    )
    x = random_test_images()
    labels = predictions(model, x)
    write_cifar10(tmp_path / "data", x, labels)
    path = tmp_path / "other_code.pt"  # kuangliu-style head name and DataParallel prefix, plain dict
    torch.save({f"module.{k.replace('fc.', 'linear.')}": v for k, v in model.state_dict().items()}, path)
    out = tmp_path / "eval"
    code, text = run_eval(
        [
            f"state_dict={path}",
            "model.name=preact_resnet18",
            "model.normalize=meanstd",
            f"model.width={WIDTH}",
            "dataset.name=cifar10",
            *data_args(tmp_path / "data"),
            "eval=quick",
            "debug=fast",
            "logger=none",
            f"hydra.run.dir={out}",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, text
    results = json.loads((out / "results.json").read_text())
    assert results["model"]["source"] == "state_dict" and results["model"]["name"] == "other_code"
    assert results["model"]["key_changes"] == ["renamed linear.* to fc.*"]
    assert results["eval"]["state_dict"]["attacks"]["clean"]["accuracy"] == 100.0


@pytest.mark.parametrize(
    "case",
    [
        "no_normalize",
        "no_dataset",
        "ours_as_state_dict",
        "two_sources",
        "unknown_zoo_name",
        "missing_zoo_file",
        "zoo_model_name",
        "weights_ema",
        "buffers_disagree",
        "width_from_debug_only",
    ],
)
def test_refusals_are_one_line(case, tmp_path, capsys, monkeypatch) -> None:
    model = build_model("preact_resnet18", 10, (0.5,) * 3, (0.25,) * 3, width=WIDTH)
    weights = tmp_path / "w.pt"
    torch.save(model.state_dict(), weights)
    ours = tmp_path / "run" / "best.pt"
    save_checkpoint({"config": {}, "epoch": 1, "model": model.state_dict()}, ours)
    models = tmp_path / "models"
    write_zoo_file(models, "Wang2023Better_WRN-28-10", _dm_model().state_dict())
    wong = build_model("preact_resnet18_wong", 10, (0.5,) * 3, (0.25,) * 3, width=WIDTH).state_dict()
    wong_sd = dict(wong) | {"mu": torch.full((1, 3, 1, 1), 0.5), "sigma": torch.full((1, 3, 1, 1), 0.5)}
    write_zoo_file(models, "Wong2020Fast", wong_sd)
    write_cifar10(tmp_path / "data", random_test_images(), np.zeros(8, dtype=np.int64))
    zoo_args = [f"model_zoo.dir={models}", *data_args(tmp_path / "data")]
    sd_args = [f"state_dict={weights}", "model.name=preact_resnet18", f"model.width={WIDTH}"]
    argv, expected = {
        "no_normalize": ([*sd_args, "dataset.name=cifar10"], "needs model.normalize"),
        "no_dataset": ([*sd_args, "model.normalize=none"], "needs dataset.name"),
        "ours_as_state_dict": (
            [
                f"state_dict={ours}",
                "model.name=preact_resnet18",
                "model.normalize=none",
                "dataset.name=cifar10",
            ],
            "is a robust-train checkpoint: evaluate it with checkpoint=",
        ),
        "two_sources": ([f"checkpoint={ours}", "model_zoo.name=Wong2020Fast"], "are both set"),
        "unknown_zoo_name": (
            ["model_zoo.name=Wang2023Better_WRN28-10", *zoo_args],
            "did you mean `Wang2023Better_WRN-28-10`?",
        ),
        "missing_zoo_file": (
            ["model_zoo.name=Zhang2019Theoretically", *zoo_args],
            "Zhang2019Theoretically.pt does not exist; RobustBench's layout",
        ),
        "zoo_model_name": (
            ["model_zoo.name=Wong2020Fast", "model.name=preact_resnet18", *zoo_args],
            "model.name cannot be set for model_zoo.name=Wong2020Fast",
        ),
        "weights_ema": (["model_zoo.name=Wong2020Fast", "weights=ema", *zoo_args], "applies to robust-train"),
        "buffers_disagree": (
            ["model_zoo.name=Wong2020Fast", f"model.width={WIDTH}", *zoo_args],
            "carries normalization buffers mu=[0.5, 0.5, 0.5]",
        ),
        # debug=fast's width is not applied to foreign weights: the tiny file does not fit full width.
        "width_from_debug_only": (
            ["model_zoo.name=Wang2023Better_WRN-28-10", "debug=fast", *zoo_args],
            "weights do not fit model 'wrn28_10_silu'",
        ),
    }[case]
    monkeypatch.chdir(tmp_path)
    code, text = run_eval([*argv, "logger=none", f"hydra.run.dir={tmp_path / 'eval'}"], capsys, monkeypatch)
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("robust-eval: error: "), text
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "eval").exists()


def test_plain_state_dict_as_checkpoint_points_to_state_dict(tmp_path, capsys, monkeypatch) -> None:
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"conv.weight": torch.zeros(1)}}, path)
    code, text = run_eval(
        [f"checkpoint={path}", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}"], capsys, monkeypatch
    )
    assert code == 2 and "not a robust-train checkpoint" in text and "state_dict=<file> model.name=" in text


def test_zoo_model_on_a_folder_of_images(tmp_path, capsys, monkeypatch) -> None:
    """A zoo model on labelled PNG files (dataset.name=image_folder): its classes, its preprocessing."""
    from PIL import Image

    model = _dm_model()
    x = random_test_images()
    labels = predictions(model, x)
    for i, (image, label) in enumerate(zip(x, labels, strict=True)):
        folder = tmp_path / "images" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i}.png")
    write_zoo_file(tmp_path / "models", "Wang2023Better_WRN-28-10", model.state_dict())
    classes = "[" + ",".join(f"class{i}" for i in range(10)) + "]"
    out = tmp_path / "eval"
    code, text = run_eval(
        [
            "model_zoo.name=Wang2023Better_WRN-28-10",
            f"model_zoo.dir={tmp_path / 'models'}",
            f"model.width={WIDTH}",
            "dataset.name=image_folder",
            f"dataset.root={tmp_path / 'images'}",
            f"dataset.classes={classes}",
            "eval=quick",
            "logger=none",
            f"hydra.run.dir={out}",
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, text
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"]["name"] == "image_folder"
    clean = results["eval"]["robustbench"]["attacks"]["clean"]
    assert clean["accuracy"] == 100.0 and clean["n"] == len(x)
