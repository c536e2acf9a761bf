"""Other people's weights: RobustBench model-zoo files, plain state_dicts, and export to the zoo format.

RobustBench's layout (robustbench 1.1.1, `utils.load_model`): a model lives at
`<model_dir>/<dataset>/<threat_model>/<name>.pt` with dataset `cifar10|cifar100|imagenet` and threat
model `Linf|L2|corruptions`. The file holds `{'state_dict': ...}`, `{'model_state_dict': ...}` or a plain
state_dict, whose keys may carry DataParallel's `module.` prefix (or a wrapper's `model.`). The
architecture is not in the file: RobustBench's own table (`model_zoo/cifar10.py`) names the class for
each model name. `ZOO` below is our table: each supported name maps to one of our architectures, its
options and its preprocessing, checked against RobustBench's class definitions.

`load_weights` reads any weights file into a `LoadedWeights` (our checkpoints, RobustBench files, plain
state_dicts); `robust-eval` (commands/evaluate.py) and `model.init_from` build on it. `export_model`
writes one of our checkpoints in the zoo layout with a model card (`robust-export`).

This module imports the models package lazily: models/ may import it without a cycle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from robust_train.errors import CheckpointError, ConfigError, ResultsError
from robust_train.io import atomic_write, sha256_file
from robust_train.registry import NODE_SCHEMAS
from robust_train.schema import Schema, did_you_mean
from robust_train.tracking.checkpoint import (
    check_checkpoint_state,
    is_robust_train_checkpoint,
    read_torch_file,
)

if TYPE_CHECKING:
    from torch import nn

WeightsKind = Literal["robust-train", "robustbench", "state_dict"]
WEIGHTS_KINDS: tuple[str, ...] = ("robust-train", "robustbench", "state_dict")

# RobustBench's folder names (model_zoo/enums.py: BenchmarkDataset, ThreatModel values).
RB_DATASETS = ("cifar10", "cifar100", "imagenet")
RB_THREAT_MODELS = ("Linf", "L2", "corruptions")
# Those we evaluate: our datasets of the same name, and the two norm-bounded threat models.
ZOO_DATASETS = ("cifar10", "cifar100")
ZOO_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
ZOO_THREAT_MODELS = ("Linf", "L2")
THREAT_NORMS = {"Linf": "linf", "L2": "l2"}
NORM_THREAT_MODELS = {v: k for k, v in THREAT_NORMS.items()}
# The radius RobustBench's leaderboards evaluate at (CIFAR-10/100: L-inf 8/255, L2 0.5).
ZOO_EPS: dict[str, float] = {"Linf": 8 / 255, "L2": 0.5}
ZOO_EPS_TEXT: dict[str, str] = {"Linf": "8/255", "L2": "0.5"}

# Where other tools keep the state_dict inside a checkpoint dict, in the order RobustBench tries them.
CONTAINER_KEYS = ("state_dict", "model_state_dict")
# Wrapper prefixes stripped when every key carries them (DataParallel; RobustBench also strips `model.`).
WRAPPER_PREFIXES = ("module.", "model.")
# Input-normalization buffers some definitions keep in the state_dict (RobustBench's `mu`/`sigma`); ours
# are not persistent, so they are taken out of the weights and reported in `meta["normalization"]`.
NORMALIZATION_BUFFERS = (("mu", "sigma"), ("mean", "std"), ("normalize.mean", "normalize.std"))

# DeepMind's CIFAR statistics, as RobustBench's DMWideResNet uses them (dm_wide_resnet.py).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class LoadedWeights:
    """Weights read from a file, in a form our models load.

    `state_dict`: tensors only, the container unwrapped, wrapper prefixes and normalization buffers
    removed. `kind`: `robust-train` (our checkpoint), `robustbench` (a `.pt` in the zoo layout
    `<dir>/<dataset>/<threat_model>/<name>.pt`) or `state_dict` (any other file). `meta` always holds
    `path` and `sha256`; our checkpoints add `config`, `epoch`, `num_classes`, `mean`, `std`,
    `image_shape` and `weights` (`trained` or `ema`: which were read); other files add `container`
    (the key the weights were under, or None), `stripped_prefixes`, `normalization` ({buffer: values}
    found in the file, or None), and for zoo files `zoo` ({name, dataset, threat_model}) and `card`
    (the `<name>.json` beside the file, or None).
    """

    state_dict: dict[str, Tensor]
    kind: WeightsKind
    meta: dict[str, Any] = field(default_factory=dict)


def zoo_location(path: Path | str) -> tuple[str, str, str] | None:
    """(name, dataset, threat_model) when `path` sits in RobustBench's layout, else None."""
    path = Path(path)
    if path.suffix != ".pt":
        return None
    threat_model, dataset = path.parent.name, path.parent.parent.name
    if dataset in RB_DATASETS and threat_model in RB_THREAT_MODELS:
        return path.stem, dataset, threat_model
    return None


def _unwrap(raw: Any, path: Path) -> tuple[dict[str, Any], str | None]:
    """The state_dict inside `raw` and the key it was under (None: `raw` is the state_dict)."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} holds a {type(raw).__name__}, not a state_dict or a dict holding one")
    for key in CONTAINER_KEYS:
        inner = raw.get(key)
        if isinstance(inner, Mapping):
            return dict(inner), key
    return dict(raw), None


def _strip_prefixes(state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    stripped = []
    for prefix in WRAPPER_PREFIXES:
        # Only when every key has it: a model with a submodule called `model` keeps its names.
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
            stripped.append(prefix)
    return state_dict, stripped


def _pop_normalization(state_dict: dict[str, Any]) -> dict[str, list[float]] | None:
    found: dict[str, list[float]] = {}
    for pair in NORMALIZATION_BUFFERS:
        if all(isinstance(state_dict.get(k), Tensor) for k in pair):
            for k in pair:
                found[k] = [float(v) for v in state_dict.pop(k).flatten().tolist()]
    return found or None


def _tensors_only(state_dict: Mapping[str, Any], path: Path) -> dict[str, Tensor]:
    others = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if others or not state_dict:
        shown = ", ".join(map(str, list(state_dict)[:6]))
        raise CheckpointError(
            f"{path} holds no state_dict: expected tensors by parameter name, under 'state_dict', "
            f"'model_state_dict' or at the top level; found keys: {shown or '(none)'}"
        )
    return dict(state_dict)


def read_card(pt_path: Path | str) -> dict[str, Any] | None:
    """The model card `<name>.json` beside a zoo `.pt` (RobustBench's model_info fields), or None."""
    card_path = Path(pt_path).with_suffix(".json")
    if not card_path.is_file():
        return None
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"model card {card_path} is unreadable (not JSON): {err}") from None
    if not isinstance(card, dict):
        raise CheckpointError(f"model card {card_path} holds a {type(card).__name__}, not a JSON object")
    return card


def load_weights(path: Path | str, weights: str = "auto") -> LoadedWeights:
    """Read weights from our checkpoint, a RobustBench zoo file or a plain state_dict file.

    `weights` applies to our checkpoints (`robust_train.training.ema.checkpoint_weights`): `auto` takes
    the checkpoint's own rule (best.pt of an EMA run and ema.pt: the averaged weights; otherwise the
    trained ones), `trained` or `ema` ask for one; `meta["weights"]` says which was read. CheckpointError
    (one line) for a missing, unreadable, corrupt or pickled-object file, or one that holds no
    state_dict. No key is renamed here: `fit_state_dict` adapts names to a particular model.
    """
    from robust_train.training.ema import checkpoint_weights

    path = Path(path)
    raw = read_torch_file(path)
    digest = sha256_file(path)
    if is_robust_train_checkpoint(raw):
        state = check_checkpoint_state(path, raw)
        chosen, which = checkpoint_weights(state, weights, path)
        meta = {
            "path": str(path),
            "sha256": digest,
            "weights": which,
            "config": state.get("config"),
            "epoch": state.get("epoch"),
            **{k: state.get(k) for k in ("num_classes", "mean", "std", "image_shape")},
        }
        return LoadedWeights(_tensors_only(chosen, path), "robust-train", meta)
    state_dict, container = _unwrap(raw, path)
    state_dict, stripped = _strip_prefixes(state_dict)
    normalization = _pop_normalization(state_dict)
    tensors = _tensors_only(state_dict, path)
    meta = {
        "path": str(path),
        "sha256": digest,
        "container": container,
        "stripped_prefixes": stripped,
        "normalization": normalization,
    }
    location = zoo_location(path)
    if location is None:
        return LoadedWeights(tensors, "state_dict", meta)
    name, dataset, threat_model = location
    meta["zoo"] = {"name": name, "dataset": dataset, "threat_model": threat_model}
    meta["card"] = read_card(path)
    return LoadedWeights(tensors, "robustbench", meta)


# Key conventions of the reference codes, adapted only where the target model asks for them:
# (prefix in the file, prefix the model uses).
GENERIC_RENAMES: tuple[tuple[str, str], ...] = (("linear.", "fc."),)
# Modules some reference definitions build but never call (the TRADES WRN's `sub_block1`).
GENERIC_DROPS: tuple[str, ...] = ("sub_block1.",)


def fit_state_dict(
    state_dict: Mapping[str, Tensor],
    model_keys: Iterable[str],
    renames: Sequence[tuple[str, str]] = GENERIC_RENAMES,
    drops: Sequence[str] = GENERIC_DROPS,
) -> tuple[dict[str, Tensor], list[str]]:
    """`state_dict` with other codes' key names mapped onto `model_keys`, and what was changed.

    A rename (src, dst) applies only when the file has `src.*` keys the model lacks and the model has
    `dst.*` keys the file lacks; a dropped prefix only when the model has no such keys. Anything else
    is left for `check_state_dict_compatible` to report.
    """
    expected = list(model_keys)
    out = dict(state_dict)
    changes: list[str] = []

    def has(keys: Iterable[str], prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    for prefix in drops:
        if has(out, prefix) and not has(expected, prefix):
            out = {k: v for k, v in out.items() if not k.startswith(prefix)}
            changes.append(f"dropped {prefix}* (not a module of the model)")
    for src, dst in renames:
        if has(out, src) and not has(expected, src) and has(expected, dst) and not has(out, dst):
            out = {(dst + k[len(src) :] if k.startswith(src) else k): v for k, v in out.items()}
            changes.append(f"renamed {src}* to {dst}*")
    return out, changes


def load_into(model: nn.Module, loaded: LoadedWeights | Mapping[str, Tensor], source: str) -> list[str]:
    """Fit and load weights into `model` (strict); CheckpointError naming the first mismatches."""
    from robust_train.models import check_state_dict_compatible

    state_dict = loaded.state_dict if isinstance(loaded, LoadedWeights) else dict(loaded)
    fitted, changes = fit_state_dict(state_dict, model.state_dict().keys())
    check_state_dict_compatible(model, fitted, source)
    model.load_state_dict(fitted)
    return changes


# ----------------------------------------------------------------------------------------------------------
# The zoo table


@dataclass(frozen=True)
class ZooEntry:
    """One RobustBench model mapped onto our architecture.

    `architecture` is a MODELS name, `options` its schema options besides width/normalize; `normalize`
    and `mean`/`std` are the preprocessing RobustBench's class applies inside its forward. `reference`
    is the class as RobustBench 1.1.1 defines it (model_zoo/cifar10.py), the source of this mapping.
    """

    name: str
    dataset: str
    threat_models: tuple[str, ...]
    architecture: str
    normalize: Literal["none", "meanstd"]
    reference: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def preprocessing(self) -> dict[str, Any]:
        return preprocessing_dict(self.normalize, self.mean, self.std)


def preprocessing_dict(
    normalize: str, mean: Sequence[float] | None, std: Sequence[float] | None
) -> dict[str, Any]:
    """How a model maps its input: [0, 1] RGB images, then (x - mean) / std inside the model or nothing."""
    out: dict[str, Any] = {"input": "[0, 1] RGB", "normalize": normalize}
    if normalize == "meanstd":
        out["mean"] = [float(m) for m in mean or ()]
        out["std"] = [float(s) for s in std or ()]
    return out


RB_NORMALIZED = "with mu/sigma normalization"  # Rice/Wong classes: (x - mu) / sigma before the network
RB_MU = (0.4914, 0.4822, 0.4465)
RB_SIGMA = (0.2471, 0.2435, 0.2616)


def _dm(name: str, arch: str, activation: str, threat_models: tuple[str, ...] = ("Linf",)) -> ZooEntry:
    """A DMWideResNet: normalization with DeepMind's CIFAR-10 statistics inside the model."""
    depth, width = arch.removeprefix("wrn").removesuffix("_silu").split("_")
    # Swish (x * sigmoid(x), a custom autograd function in RobustBench) is nn.SiLU's function.
    return ZooEntry(
        name, "cifar10", threat_models, arch, "meanstd",
        f"DMWideResNet(depth={depth}, width={width}, activation_fn={activation}, mean=CIFAR10_MEAN, "
        "std=CIFAR10_STD)",
        CIFAR10_MEAN, CIFAR10_STD,
    )  # fmt: skip


def _wrn(name: str, arch: str, sub_block1: bool, threat_models: tuple[str, ...] = ("Linf",)) -> ZooEntry:
    """The TRADES-code WideResNet: no normalization; `sub_block1` built but never called."""
    depth, widen = arch.removeprefix("wrn").split("_")
    extra = ", sub_block1=True" if sub_block1 else ""
    return ZooEntry(
        name,
        "cifar10",
        threat_models,
        arch,
        "none",
        f"WideResNet(depth={depth}, widen_factor={widen}{extra})",
    )


# RobustBench 1.1.1's CIFAR-10 models whose class is one of our architectures. Each mapping is checked
# in tests/evaluation/test_zoo.py on weights in RobustBench's key layout.
ZOO_ENTRIES: tuple[ZooEntry, ...] = (
    _dm("Wang2023Better_WRN-28-10", "wrn28_10_silu", "nn.SiLU", ("Linf", "L2")),
    _dm("Wang2023Better_WRN-70-16", "wrn70_16_silu", "nn.SiLU", ("Linf", "L2")),
    _dm("Xu2023Exploring_WRN-28-10", "wrn28_10_silu", "nn.SiLU"),
    _dm("Cui2023Decoupled_WRN-28-10", "wrn28_10_silu", "nn.SiLU"),
    _dm("Gowal2020Uncovering_28_10_extra", "wrn28_10_silu", "Swish"),
    _dm("Gowal2020Uncovering_70_16", "wrn70_16_silu", "Swish"),
    _dm("Gowal2020Uncovering_70_16_extra", "wrn70_16_silu", "Swish"),
    _dm("Gowal2020Uncovering", "wrn70_16_silu", "Swish", ("L2",)),
    _dm("Gowal2020Uncovering_extra", "wrn70_16_silu", "Swish", ("L2",)),
    _dm("Rebuffi2021Fixing_28_10_cutmix_ddpm", "wrn28_10_silu", "Swish", ("Linf", "L2")),
    _dm("Rebuffi2021Fixing_70_16_cutmix_ddpm", "wrn70_16_silu", "Swish", ("Linf", "L2")),
    _dm("Rebuffi2021Fixing_70_16_cutmix_extra", "wrn70_16_silu", "Swish", ("Linf", "L2")),
    _dm("Rade2021Helper_ddpm", "wrn28_10_silu", "Swish"),
    _dm("Gowal2021Improving_28_10_ddpm_100m", "wrn28_10_silu", "Swish"),
    _dm("Gowal2021Improving_70_16_ddpm_100m", "wrn70_16_silu", "Swish"),
    _dm("Pang2022Robustness_WRN28_10", "wrn28_10_silu", "Swish"),
    _dm("Pang2022Robustness_WRN70_16", "wrn70_16_silu", "Swish"),
    _dm("Gowal2020Uncovering_34_20", "wrn34_20_silu", "Swish"),
    _dm("Rade2021Helper_extra", "wrn34_10_silu", "Swish"),
    _dm("Rebuffi2021Fixing_106_16_cutmix_ddpm", "wrn106_16_silu", "Swish"),
    _dm("Bartoldson2024Adversarial_WRN-94-16", "wrn94_16_silu", "nn.SiLU"),
    _dm("Bartoldson2024Adversarial_WRN-82-8", "wrn82_8_silu", "nn.SiLU"),
    ZooEntry(
        "Wong2020Fast", "cifar10", ("Linf",), "preact_resnet18_wong", "meanstd",
        f"Wong2020FastNet: PreActResNet(PreActBlock, [2, 2, 2, 2]) {RB_NORMALIZED}", RB_MU, RB_SIGMA,
    ),
    ZooEntry(
        "Rice2020Overfitting", "cifar10", ("Linf",), "wrn34_20", "meanstd",
        f"Rice2020OverfittingNet: WideResNet(depth=34, widen_factor=20) {RB_NORMALIZED}", RB_MU, RB_SIGMA,
    ),
    ZooEntry(
        "Rice2020Overfitting", "cifar10", ("L2",), "preact_resnet18", "meanstd",
        "Rice2020OverfittingNetL2: PreActResNet(PreActBlockV2, [2, 2, 2, 2], bn_before_fc=True) "
        + RB_NORMALIZED,
        RB_MU, RB_SIGMA, {"shortcut_input": "preact"},
    ),
    _wrn("Chen2024Data_WRN_34_20", "wrn34_20", False),
    _wrn("Chen2021LTD_WRN34_20", "wrn34_20", False),
    _wrn("Cui2020Learnable_34_20", "wrn34_20", True),
    _wrn("Zhang2019Theoretically", "wrn34_10", True),
    _wrn("Zhang2019You", "wrn34_10", True),
    _wrn("Zhang2020Attacks", "wrn34_10", True),
    _wrn("Huang2020Self", "wrn34_10", True),
    _wrn("Sitawarin2020Improving", "wrn34_10", True),
    _wrn("Cui2020Learnable_34_10", "wrn34_10", True),
    _wrn("Addepalli2021Towards_WRN34", "wrn34_10", True),
    _wrn("Sehwag2021Proxy", "wrn34_10", False, ("Linf", "L2")),
    _wrn("Chen2021LTD_WRN34_10", "wrn34_10", False),
    _wrn("Jia2022LAS-AT_34_10", "wrn34_10", False),
    _wrn("Addepalli2022Efficient_WRN_34_10", "wrn34_10", False),
    _wrn("Cui2023Decoupled_WRN-34-10", "wrn34_10", False),
    _wrn("Chen2024Data_WRN_34_10", "wrn34_10", False),
    _wrn("Carmon2019Unlabeled", "wrn28_10", True),
    _wrn("Sehwag2020Hydra", "wrn28_10", True),
    _wrn("Wang2020Improving", "wrn28_10", True),
    _wrn("Wu2020Adversarial_extra", "wrn28_10", True),
    _wrn("Zhang2020Geometry", "wrn28_10", True),
    _wrn("Sridhar2021Robust", "wrn28_10", True),
    _wrn("Standard", "wrn28_10", False, ("Linf", "L2")),
)  # fmt: skip

ZOO: dict[tuple[str, str, str], ZooEntry] = {
    (e.dataset, tm, e.name): e for e in ZOO_ENTRIES for tm in e.threat_models
}


def zoo_names(dataset: str, threat_model: str) -> list[str]:
    """The supported model names of one leaderboard, in table order."""
    return [name for (ds, tm, name) in ZOO if (ds, tm) == (dataset, threat_model)]


def zoo_entry(name: str, dataset: str, threat_model: str) -> ZooEntry:
    """The table's entry; ConfigError with the closest supported name and the full list otherwise."""
    entry = ZOO.get((dataset, threat_model, name))
    if entry is not None:
        return entry
    names = zoo_names(dataset, threat_model)
    other = sorted({f"{tm}" for (ds, tm, n) in ZOO if n == name and (ds, tm) != (dataset, threat_model)})
    where = f" (it is listed for model_zoo.threat_model={', '.join(other)})" if other else ""
    raise ConfigError(
        f"model_zoo.name={name!r} is not a supported {dataset} {threat_model} model{where}"
        f"{did_you_mean(name, names)}; supported: {', '.join(names) or '(none)'}, or any file with a "
        "robust-export model card (<name>.json) beside it"
    )


class ModelZooConfig(Schema):
    """robust-eval's `model_zoo` node: a RobustBench model from a local directory in its layout."""

    name: str | None = None  # e.g. Wang2023Better_WRN-28-10; null: not evaluating a zoo model
    threat_model: Literal["Linf", "L2"] = "Linf"
    dataset: Literal["cifar10", "cifar100"] = "cifar10"
    dir: str = Field(default="./models", min_length=1)  # RobustBench's model_dir


NODE_SCHEMAS["model_zoo"] = ModelZooConfig


def zoo_path(model_dir: Path | str, dataset: str, threat_model: str, name: str) -> Path:
    """`<model_dir>/<dataset>/<threat_model>/<name>.pt`, RobustBench's file of a model."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


@dataclass(frozen=True)
class ZooModel:
    """What a zoo file needs to be evaluated: our architecture node, preprocessing and threat model."""

    name: str
    dataset: str
    threat_model: str
    path: Path
    model: dict[str, Any]  # a `model` config node: name, normalize and architecture options
    normalize: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    eps: float
    described_by: str  # "table" or "card"
    card: dict[str, Any] | None = None

    @property
    def norm(self) -> str:
        return THREAT_NORMS[self.threat_model]

    def preprocessing(self) -> dict[str, Any]:
        return preprocessing_dict(self.normalize, self.mean, self.std)


def card_block(card: Mapping[str, Any], card_path: Path) -> dict[str, Any] | None:
    """The `robust_train` block of a robust-export model card (architecture, preprocessing), or None."""
    block = card.get("robust_train")
    if block is None:
        return None
    model = block.get("model") if isinstance(block, Mapping) else None
    if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
        raise CheckpointError(f"model card {card_path}: robust_train.model must name an architecture")
    return dict(block)


def resolve_zoo_model(cfg: ModelZooConfig) -> ZooModel:
    """The zoo model `cfg` names: its file in the layout and how to build it (table or model card)."""
    if cfg.name is None:
        raise ConfigError("model_zoo.name is required, e.g. model_zoo.name=Wang2023Better_WRN-28-10")
    path = zoo_path(cfg.dir, cfg.dataset, cfg.threat_model, cfg.name)
    card = read_card(path) if path.is_file() else None
    block = card_block(card, path.with_suffix(".json")) if card is not None else None
    if block is not None:
        # A robust-export card describes exactly this file; it wins over the table.
        model = dict(block["model"])
        normalize = str(model.get("normalize", "meanstd"))
        mean = tuple(float(m) for m in block.get("mean") or ()) or None
        std = tuple(float(s) for s in block.get("std") or ()) or None
        eps = float((block.get("threat") or {}).get("eps", ZOO_EPS[cfg.threat_model]))
        described_by = "card"
    else:
        entry = zoo_entry(cfg.name, cfg.dataset, cfg.threat_model)
        model = {"name": entry.architecture, "normalize": entry.normalize, **entry.options}
        normalize, mean, std, eps = entry.normalize, entry.mean, entry.std, ZOO_EPS[cfg.threat_model]
        described_by = "table"
    if not path.is_file():
        raise CheckpointError(
            f"model_zoo: {path} does not exist; RobustBench's layout is <model_zoo.dir>/<dataset>/"
            f"<threat_model>/<name>.pt (robustbench.utils.load_model(..., model_dir=...) downloads it there)"
        )
    return ZooModel(
        cfg.name, cfg.dataset, cfg.threat_model, path, model, normalize, mean, std, eps, described_by, card
    )


# ----------------------------------------------------------------------------------------------------------
# Model identity (results.json `model`, W&B)


def model_identity(
    source: WeightsKind,
    name: str,
    file: Path | str,
    sha256: str,
    model_node: Mapping[str, Any],
    preprocessing: Mapping[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """Which weights were evaluated: results.json's `model` node and the W&B config's."""
    options = {k: v for k, v in model_node.items() if k != "name"}
    return {
        "source": source,
        "name": name,
        "file": str(file),
        "sha256": sha256,
        "architecture": model_node.get("name"),
        "architecture_options": options,
        "preprocessing": dict(preprocessing),
        **extra,
    }


def format_identity(identity: Mapping[str, Any]) -> str:
    """One line for the console: source, name, file hash, architecture and preprocessing."""
    pre = identity.get("preprocessing") or {}
    if pre.get("normalize") == "meanstd":
        mean = ", ".join(f"{m:.4g}" for m in pre.get("mean") or ())
        std = ", ".join(f"{s:.4g}" for s in pre.get("std") or ())
        how = f"(x - [{mean}]) / [{std}] inside the model"
    else:
        how = "none (the model takes [0, 1] pixels as they are)"
    width = (identity.get("architecture_options") or {}).get("width")
    shown = "" if width is None else f"width {width:g}"
    return (
        f"model: {identity.get('source')} {identity.get('name')} ({identity.get('file')}, sha256 "
        f"{str(identity.get('sha256'))[:12]}), architecture {identity.get('architecture')}"
        f"{f' ({shown})' if shown else ''}; preprocessing: [0, 1] RGB input, {how}"
    )


# ----------------------------------------------------------------------------------------------------------
# Export: our checkpoint -> <out>/<dataset>/<threat_model>/<name>.pt + <name>.json

CARD_FORMAT = "robust-train-model-card"
CARD_VERSION = 1
# RobustBench's model_info fields (robustbench.utils.ModelInfo), in its order.
MODEL_INFO_FIELDS = (
    "link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
    "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "footnote",
)  # fmt: skip
# How the architecture column of RobustBench's leaderboards names our models.
ARCHITECTURE_NAMES = {
    "preact_resnet18": "PreActResNet-18",
    "preact_resnet18_wong": "PreActResNet-18",
    "preact_resnet56": "PreActResNet-56",
    "resnet18": "ResNet-18",
    "vgg16_bn": "VGG-16-BN",
    "mobilenet_v2": "MobileNetV2",
}


def architecture_name(model_node: Mapping[str, Any]) -> str:
    """`WideResNet-28-10` for wrn28_10(_silu), the leaderboard's names for the others; width noted."""
    name = str(model_node.get("name"))
    parts = name.removeprefix("wrn").removesuffix("_silu").split("_")
    if name.startswith("wrn") and len(parts) == 2 and all(p.isdigit() for p in parts):
        text = f"WideResNet-{parts[0]}-{parts[1]}" + (" (SiLU)" if name.endswith("_silu") else "")
    else:
        text = ARCHITECTURE_NAMES.get(name, name)
    width = model_node.get("width", 1.0)
    return text if width in (None, 1, 1.0) else f"{text} (width x{width:g})"


def eps_text(eps: float, norm: str) -> str:
    """8/255 for L-inf radii on the 1/255 grid (RobustBench writes them so), else the number."""
    k = eps * 255
    if norm == "linf" and abs(k - round(k)) < 1e-6 and round(k) > 0:
        return f"{round(k)}/255"
    return f"{eps:g}"


# How results.json names AutoAttack in an attack's spec (`describe()`): the lite version has its own name.
AUTOATTACK_NAMES = ("autoattack", "autoattack_lite")


def _attack_number(
    entry: Mapping[str, Any], spec_names: tuple[str, ...], norm: str | None = None, eps: float | None = None
) -> list[tuple[str, Mapping[str, Any]]]:
    """(column, result) of each attack of a checkpoint entry named in `spec_names`, at the radius."""
    found = []
    for column, result in (entry.get("attacks") or {}).items():
        spec = result.get("attack") if isinstance(result, Mapping) else None
        name = spec.get("name") if isinstance(spec, Mapping) else column
        if name not in spec_names:
            continue
        if eps is not None and isinstance(spec, Mapping) and spec.get("eps") is not None:
            if not math.isclose(float(spec["eps"]), eps, rel_tol=1e-6) or spec.get("norm", norm) != norm:
                continue
        found.append((str(column), result))
    return found


@dataclass(frozen=True)
class ExportResult:
    checkpoint: Path
    card: Path
    card_data: dict[str, Any]
    warnings: list[str]


def _source_files(source: Path, kind: str | None, results: Path | None) -> tuple[Path, Path, str]:
    if source.is_dir():
        kind = kind or "best"
        checkpoint = source / f"{kind}.pt"
    else:
        checkpoint = source
        if kind is not None and kind != source.stem:
            raise ConfigError(f"--kind {kind} names another checkpoint than {source.name}")
        kind = source.stem
    results_path = results or checkpoint.parent / "results.json"
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint} does not exist (give a run directory or a checkpoint file)")
    if not results_path.is_file():
        raise ResultsError(
            f"{results_path} does not exist: the model card takes its accuracies from a results.json "
            "(robust-train writes one per run; robust-eval one per evaluation, pass it with --results)"
        )
    return checkpoint, results_path, kind


def _same_file(recorded: Any, checkpoint: Path) -> bool:
    if not recorded:
        return False
    path = Path(str(recorded))
    try:
        return path.resolve() == checkpoint.resolve()
    except OSError:
        return False


def _eval_predictor_problem(state: Mapping[str, Any]) -> str | None:
    """Why the exported weights alone would not reproduce the evaluated predictor, or None.

    An add-on's `wrap_for_eval` (LAD's noisy ensemble) changes how the network predicts at evaluation;
    RobustBench loads bare weights.
    """
    from robust_train.addons import build_addons, selected
    from robust_train.builders import model_from_config, threat_from_config
    from robust_train.defenses import build_defense

    config = state.get("config") or {}
    if not selected(config):
        return None
    model = model_from_config(config["model"], **{k: state[k] for k in ("num_classes", "mean", "std")})
    threat = threat_from_config(config["threat"])
    ctx = {"model": model, "defense": build_defense(config["defense"], threat), "threat": threat,
           "num_classes": int(state["num_classes"]), "seed": int(config.get("seed", 0))}  # fmt: skip
    for addon in build_addons(config, ctx):
        if addon.wrap_for_eval(model) is not model:
            return (
                f"add-on `{addon.name}` changes how the model predicts at evaluation (wrap_for_eval), so "
                "the weights alone do not reproduce its numbers"
            )
    return None


def export_model(
    source: Path | str,
    out_dir: Path | str,
    name: str | None = None,
    kind: str | None = None,
    results: Path | str | None = None,
    allow_missing_aa: bool = False,
    allow_failed_sanity: bool = False,
    card_fields: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Write one of our checkpoints in RobustBench's layout with a model card.

    `<out_dir>/<dataset>/<threat_model>/<name>.pt` holds `{'state_dict': weights}`: the evaluated
    weights (the average for an EMA-evaluated checkpoint), keys exactly our architecture's. Our models
    normalize inside (`Normalize`, non-persistent like RobustBench's DMWideResNet buffers), so the
    state_dict carries no mean/std; the card states them. `<name>.json` holds RobustBench's model_info
    fields, clean and AutoAttack accuracy from results.json, and a `robust_train` block (architecture,
    preprocessing, threat, provenance) from which `robust-eval model_zoo.name=<name>` rebuilds the model.
    """
    from robust_train.tracking.checkpoint import load_checkpoint
    from robust_train.tracking.results import read_results
    from robust_train.training.ema import checkpoint_weights

    checkpoint, results_path, kind = _source_files(
        Path(source), kind, Path(results) if results is not None else None
    )
    state = load_checkpoint(checkpoint)
    data = read_results(results_path)
    config = state.get("config") or {}
    dataset = str((config.get("dataset") or {}).get("name"))
    threat = config.get("threat") or {}
    norm = str(threat.get("norm"))
    if dataset not in ZOO_DATASETS:
        raise ConfigError(
            f"{checkpoint}: dataset {dataset!r} has no RobustBench leaderboard; exportable: "
            f"{', '.join(ZOO_DATASETS)}"
        )
    if norm not in NORM_THREAT_MODELS:
        raise ConfigError(f"{checkpoint}: threat norm {norm!r} has no RobustBench threat model")
    threat_model = NORM_THREAT_MODELS[norm]
    entry = (data.get("eval") or {}).get(kind)
    if not isinstance(entry, Mapping) or "attacks" not in entry:
        raise ResultsError(
            f"{results_path} holds no evaluation of `{kind}`; evaluate it first: robust-eval "
            f"checkpoint={checkpoint} eval=default (then --results <that run's results.json>)"
        )
    digest = sha256_file(checkpoint)
    model_node = data.get("model")
    recorded: Mapping[str, Any] = model_node if isinstance(model_node, Mapping) else {}
    if recorded.get("sha256") not in (None, digest) or (
        not recorded.get("sha256") and not _same_file(entry.get("checkpoint"), checkpoint)
    ):
        raise ResultsError(
            f"{results_path} evaluated {recorded.get('file') or entry.get('checkpoint')}, not {checkpoint}: "
            "its numbers are not this file's"
        )
    eps = float(entry_eps(entry, threat))
    warnings: list[str] = []
    sanity_node = entry.get("sanity")
    sanity: Mapping[str, Any] = sanity_node if isinstance(sanity_node, Mapping) else {}
    if sanity.get("failed"):
        message = f"{results_path}: `{kind}` failed its sanity checks ({', '.join(sanity['failed'])})"
        if not allow_failed_sanity:
            raise ResultsError(
                message + "; its robust accuracy is likely overestimated (--allow-failed-sanity)"
            )
        warnings.append(message)
    clean = _attack_number(entry, ("clean",))
    if not clean:
        raise ResultsError(f"{results_path}: `{kind}` has no clean accuracy (add `clean` to the suite)")
    autoattack = _attack_number(entry, AUTOATTACK_NAMES, norm, eps)
    standard = [a for a in autoattack if (a[1].get("attack") or {}).get("version") == "standard"]
    candidates = standard or autoattack
    chosen = candidates[0] if candidates else None
    footnotes = []
    if chosen is None:
        message = (
            f"{results_path}: `{kind}` has no AutoAttack accuracy at {norm} eps {eps:g} "
            "(evaluate with eval=full or add +attack@eval.attacks.autoattack=autoattack)"
        )
        if not allow_missing_aa:
            raise ResultsError(message + "; --allow-missing-aa writes the card without it")
        warnings.append(message)
    else:
        version = (chosen[1].get("attack") or {}).get("version")
        if version != "standard":
            footnotes.append(f"AutoAttack {version} (not the standard version: APGD-CE and APGD-T only).")
            warnings.append(f"the AutoAttack number is the {version} version, not the standard one")
        n = int(chosen[1].get("n", 0))
        if n < 10000:
            footnotes.append(f"Evaluated on the first {n} test images.")
    problem = _eval_predictor_problem(state)
    if problem is not None:
        raise ConfigError(f"{checkpoint}: cannot export: {problem}")
    which = str(entry.get("weights") or "trained")
    weights, which = checkpoint_weights(state, which, checkpoint)
    model_node = {k: v for k, v in (config.get("model") or {}).items() if k not in ("init_from",)}
    name = name or f"{Path(str(data.get('run_dir') or checkpoint.parent)).name}_{kind}"
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"--name {name!r} must be a file name (RobustBench's model id)")
    extra = (config.get("dataset") or {}).get("extra")
    fields: dict[str, Any] = {
        "link": "",
        "name": name,
        "authors": "",
        "additional_data": bool(extra),
        "number_forward_passes": 1,
        "dataset": dataset,
        "venue": "",
        "architecture": architecture_name(model_node),
        "eps": eps_text(eps, norm),
        "clean_acc": f"{float(clean[0][1]['accuracy']):.2f}",
        "reported": "" if chosen is None else f"{float(chosen[1]['accuracy']):.2f}",
        "autoattack_acc": "" if chosen is None else f"{float(chosen[1]['accuracy']):.2f}",
        "footnote": " ".join(footnotes),
    }
    for key, value in (card_fields or {}).items():
        if key not in MODEL_INFO_FIELDS:
            raise ConfigError(
                f"model card field {key!r} is not one of RobustBench's: {', '.join(MODEL_INFO_FIELDS)}"
            )
        if value is not None:
            fields[key] = value
    mean, std = state.get("mean"), state.get("std")
    normalize = str(model_node.get("normalize", "meanstd"))
    target = zoo_path(out_dir, dataset, threat_model, name)
    card = {
        **fields,
        "robust_train": {
            "format": CARD_FORMAT,
            "version": CARD_VERSION,
            "model": model_node,
            "num_classes": state.get("num_classes"),
            "image_shape": state.get("image_shape"),
            "mean": mean,
            "std": std,
            "preprocessing": preprocessing_dict(normalize, mean, std),
            "dataset": dataset,
            "threat": {"norm": norm, "eps": eps},
            "weights": which,
            "source_checkpoint": str(checkpoint),
            "source_sha256": digest,
            "results": str(results_path),
            "clean": {"column": clean[0][0], "n": clean[0][1].get("n")},
            "autoattack": None
            if chosen is None
            else {
                "column": chosen[0],
                "version": (chosen[1].get("attack") or {}).get("version"),
                "n": chosen[1].get("n"),
            },  # fmt: skip
            "epoch": entry.get("epoch"),
        },
    }
    payload = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in weights.items()}}
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: torch.save(payload, tmp))
    card["robust_train"]["sha256"] = sha256_file(target)
    card_path = target.with_suffix(".json")
    atomic_write(card_path, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=2) + "\n"))
    return ExportResult(target, card_path, card, warnings)


def entry_eps(entry: Mapping[str, Any], threat: Mapping[str, Any]) -> float:
    """The radius the checkpoint was evaluated at: the suite's attacks' eps, else the run's threat.eps."""
    from robust_train.schema import to_float

    for result in (entry.get("attacks") or {}).values():
        spec = result.get("attack") if isinstance(result, Mapping) else None
        if isinstance(spec, Mapping) and spec.get("name") in AUTOATTACK_NAMES and spec.get("eps") is not None:
            return float(spec["eps"])
    return to_float(threat.get("eps"), "threat.eps")
