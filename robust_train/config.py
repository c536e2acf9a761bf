"""The run-level configuration: the schema of a whole run, its validation, and the numbers for results.

Every node is checked by the schema of the part it builds (`threat` by ThreatConfig, `dataset`, `model`,
`defense`, `eval.attacks.*` and add-ons by their registry entries' schemas, `trainer` by TrainerConfig);
this module composes them into `RunConfig` and adds the rules that need more than one node (the training
and evaluation attacks against the run's threat model, add-on/defense compatibility, whether the model
takes the dataset's images). Validation collects every problem and raises one ConfigError listing them,
so a user fixes a bad command line in one round trip; it runs before any data is read or file written.

It sits above the parts it validates (it imports them; none of them imports it).
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch

from robust_train.addons import check_addons
from robust_train.attacks import AttackConfig, check_attack
from robust_train.data import check_dataset
from robust_train.defenses.base import check_defense
from robust_train.errors import ConfigError
from robust_train.evaluation.sanity import SanityConfig
from robust_train.models import build_model, check_model
from robust_train.registry import NODE_SCHEMAS
from robust_train.schema import (
    STEP_HELP,
    Flag,
    NonNegativeInt,
    PositiveInt,
    Schema,
    ThreatConfig,
    check_node,
    plain,
    raise_problems,
    relative_step_factor,
    resolve_step,
    to_float,
)
from robust_train.tracking.wandb_run import LOGGERS
from robust_train.training.ema import EMAConfig
from robust_train.training.trainer import TrainerConfig
from robust_train.zoo import ModelZooConfig

# Number helpers, importable from here as before (their home is robust_train.schema).
__all__ = [
    "STEP_HELP",
    "EvalConfig",
    "RunConfig",
    "numeric_config",
    "relative_step_factor",
    "resolve_device",
    "resolve_step",
    "to_float",
    "validate_eval_config",
    "validate_train_config",
]

# The shape check builds the model at 1/16 of its width: channels scale, spatial sizes do not.
SHAPE_CHECK_WIDTH = 0.0625


class EvalConfig(Schema):
    """The `eval` node: the attack suite run on the test set after training and by `robust-eval`.

    `attacks` maps a column name to an attack node (validated by the schema of the attack its `name`
    selects); a node set to null is dropped from the suite.
    """

    name: str | None = None
    n_examples: PositiveInt | None = None  # the first N test images; null: all
    batch_size: PositiveInt = 256
    # `ema` (the averaged weights at the end, ema.pt) is added by itself when ema.enabled and ema.evaluate
    checkpoints: list[Literal["best", "last", "ema"]] = ["best", "last"]
    sanity: SanityConfig = SanityConfig()
    attacks: dict[str, Any] = {}
    # robust-train: evaluate a finished run again when it is rerun (otherwise its results are printed).
    force: Flag = False

    def check(self, path: str) -> list[str]:
        problems = super().check(path)
        if not any(node is not None for node in self.attacks.values()):
            problems.append(f"{path}.attacks is empty; add at least `clean`")
        return problems


NODE_SCHEMAS["eval"] = EvalConfig


class RunConfig(Schema):
    """A whole run (`robust-train`, and `robust-eval` after the checkpoint's config is merged in).

    The nodes typed `Any` are checked by the schema their `name` selects (see `check_run`).
    """

    seed: NonNegativeInt = 0
    device: str = "auto"  # auto: cuda when available, else cpu; or a torch device string
    name: str | None = None  # the W&B run name; null: <dataset>-<model>-<defense>-s<seed>
    paper: Any = None  # a preset's reference numbers, set beside ours by reports
    threat: ThreatConfig = ThreatConfig()
    dataset: Any = None
    model: Any = None
    defense: Any = None
    addons: dict[str, Any] = {}
    trainer: TrainerConfig = TrainerConfig()
    ema: EMAConfig = EMAConfig()  # weight averaging (training/ema.py)
    eval: Any = None
    logger: Any = None

    def check(self, path: str) -> list[str]:
        problems = super().check(path)
        kinds = self.eval.get("checkpoints") if isinstance(self.eval, dict) else None
        if not self.ema.enabled and "ema" in (kinds or []):
            problems.append(
                "eval.checkpoints lists `ema` but ema.enabled=false: there are no averaged weights"
            )
        return problems


class EvalCommandConfig(Schema):
    """What `robust-eval` reads itself; the rest is laid over the checkpoint's config and checked there."""

    checkpoint: Any = None
    # Someone else's weights instead of a checkpoint (robust_train/zoo.py): a weights file, or a
    # RobustBench model-zoo file by name.
    state_dict: str | None = None
    model_zoo: ModelZooConfig = ModelZooConfig()
    seed: NonNegativeInt = 0
    device: str = "auto"
    logger: Any = None
    analysis: Any = None
    analysis_options: Any = None
    model: Any = None
    dataset: Any = None
    threat: Any = None
    eval: Any = None
    trainer: Any = None  # `debug=fast` shrinks it; robust-eval does not train
    # Which weights of the checkpoint to evaluate: auto (best.pt of an EMA run and ema.pt: the averaged
    # ones; otherwise the trained ones), trained, or ema (the average kept in last.pt/best.pt).
    weights: Literal["auto", "trained", "ema"] = "auto"


def check_logger(node: Any, path: str = "logger") -> tuple[Schema | None, list[str]]:
    data = plain(node) or {}
    name = data.get("name") if isinstance(data, dict) else None
    if name not in LOGGERS:
        return None, [f"{path}.name={name!r} is not allowed; choose one of: {', '.join(LOGGERS)}"]
    return check_node(LOGGERS[name], data, path)


def check_eval(
    node: Any, norm: str | None, eps: float | None, path: str = "eval"
) -> tuple[EvalConfig | None, list[str]]:
    """The `eval` node with each attack validated by its own schema and against the run's threat."""
    data = plain(node) or {}
    cfg, problems = check_node(EvalConfig, data, path)
    attacks: dict[str, AttackConfig | None] = {}
    for name, attack in ((data.get("attacks") if isinstance(data, dict) else None) or {}).items():
        if attack is None:  # dropped from the suite on the command line with eval.attacks.NAME=null
            attacks[name] = None
            continue
        validated, found = check_attack(attack, f"{path}.attacks.{name}", norm, eps)
        attacks[name] = validated
        problems += found
    if problems or cfg is None:
        return None, problems
    cfg.attacks = attacks
    return cfg, []


def _check_device(device: Any) -> list[str]:
    if device in (None, "auto", "cpu"):
        return []
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        return [f"device={device!r} is not a torch device; allowed: auto, cpu, cuda, cuda:N"]
    if dev.type == "cuda" and not torch.cuda.is_available():
        return [f"device={device!r} but CUDA is not available here; use device=auto or device=cpu"]
    return []


def _partial_threat(node: Any) -> tuple[str | None, float | None]:
    """The run's norm and eps where they are valid (None otherwise), for the rules that depend on them."""
    node = node if isinstance(node, dict) else {}
    norm = node.get("norm") if node.get("norm") in ("linf", "l2") else None
    try:
        eps = to_float(node.get("eps"), "threat.eps")
    except ConfigError:
        eps = None
    return norm, eps


def _check_shapes(dataset: Any, model: Any) -> list[str]:
    """The model must accept the dataset's images: a shape-only forward of a thin copy on the CPU."""
    shape = dataset.image_shape
    if shape is None:
        return []
    classes = dataset.num_classes or 10
    mean = tuple(dataset.mean or (0.5,) * shape[0])
    std = tuple(dataset.std or (0.25,) * shape[0])
    # Width scales channels only, never spatial sizes: a 1/16-width copy on the CPU answers "does this
    # architecture take these images" in milliseconds (the meta device would first import torch's
    # decompositions, seconds per process).
    options = {k: v for k, v in model.options().items() if k != "width"}
    try:
        net = build_model(
            model.name, num_classes=classes, mean=mean, std=std, width=SHAPE_CHECK_WIDTH, **options
        )
    except ConfigError:
        raise
    except Exception:
        return []  # a model that cannot be built thin is checked when the real one is built
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, *shape))
    except Exception as err:  # shape errors come as RuntimeError/ValueError from torch
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [
            f"model={model.name} cannot take dataset={dataset.name} images of shape {list(shape)}: {first}"
        ]
    if tuple(out.shape) != (2, classes):
        return [
            f"model={model.name} returns {tuple(out.shape)[1:]} outputs for dataset={dataset.name}; "
            f"expected {classes} classes"
        ]
    return []


def check_run(cfg: Any) -> list[str]:
    """Every problem of a composed run config (an empty list: the run may start)."""
    data = plain(cfg)
    if not isinstance(data, dict):
        return [f"the run config must be a mapping, not {type(data).__name__}"]
    run, problems = check_node(RunConfig, data, "")
    problems += _check_device(data.get("device"))
    norm, eps = (run.threat.norm, run.threat.eps) if run is not None else _partial_threat(data.get("threat"))
    dataset, found = check_dataset(data.get("dataset"))
    problems += found
    model, found = check_model(data.get("model"))
    problems += found
    defense_node = data.get("defense")
    _, found = check_defense(defense_node)
    problems += found
    attack = defense_node.get("attack") if isinstance(defense_node, dict) else None
    if attack is not None:
        problems += check_attack(attack, "defense.attack", norm, eps)[1]
    problems += check_eval(data.get("eval"), norm, eps)[1]
    problems += check_logger(data.get("logger"))[1]
    if not problems:
        problems += check_addons(cfg)
    if not problems and dataset is not None and model is not None:
        problems += _check_shapes(dataset, model)
    return problems


def validate_train_config(cfg: Any) -> None:
    """Check a composed training config; raise one ConfigError describing every problem found."""
    raise_problems(check_run(cfg))


def validate_eval_config(cfg: Any) -> None:
    """Check the parts of a `robust-eval` config that can be checked before the checkpoint is read.

    The eval suite interpolates the threat model, which comes from the checkpoint: it is checked on the
    merged config (`validate_train_config`).
    """
    data = plain(cfg)
    _, problems = check_node(EvalCommandConfig, data, "")
    problems += _check_device(data.get("device"))
    problems += check_logger(data.get("logger"))[1]
    raise_problems(problems)


def numeric_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a resolved config whose radii and step sizes are numbers in pixel units.

    Configs may write 8/255 or eps/4; results.json and W&B get the numbers every attack used, so a
    column holds one type and can be filtered and plotted across datasets. Every node with an `eps`
    (the run's threat model, a dataset's, an attack's own, one nested in an attack's options) gets
    numbers; a `step` resolves against the nearest `eps` above it, which is the run's `threat.eps` for
    the training attack and the suite. Unparseable values are left as written (validation reports
    them).
    """
    out = copy.deepcopy(config)

    def convert(node: Any, eps: float | None) -> None:
        if isinstance(node, list):
            for item in node:
                convert(item, eps)
            return
        if not isinstance(node, dict):
            return
        try:
            if node.get("eps") is not None:
                node["eps"] = eps = to_float(node["eps"], "eps")
            if node.get("step") is not None and eps is not None:
                node["step"] = resolve_step(node["step"], eps, "step")
        except ConfigError:
            pass
        for key, child in node.items():
            if key not in ("eps", "step"):
                convert(child, eps)

    threat = out.get("threat")
    convert(threat, None)
    run_eps = threat.get("eps") if isinstance(threat, dict) else None
    for key, node in out.items():
        if key != "threat":
            convert(node, run_eps if isinstance(run_eps, float) else None)
    return out


def resolve_device(device: str | None) -> torch.device:
    """`auto` picks CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(str(device))
