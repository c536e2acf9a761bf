"""`robust-eval`: evaluate a saved checkpoint with an eval suite and write results.json."""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from torch import nn

from robust_train.addons import build_addons
from robust_train.builders import model_from_config, threat_from_config
from robust_train.commands.train import run_tags
from robust_train.config import (
    numeric_config,
    resolve_device,
    validate_eval_config,
    validate_train_config,
)
from robust_train.data import build_dataset
from robust_train.defenses import build_defense
from robust_train.errors import CheckpointError, ConfigError
from robust_train.eval_dirs import checkpoint_file
from robust_train.evaluation.analysis import (
    evaluate_sibling,
    format_analysis,
    format_gap,
    log_analysis,
    run_analysis,
    suite_gap,
    validate_analysis,
)
from robust_train.evaluation.evaluate import EvalSetup, evaluate_model, log_evaluation
from robust_train.io import sha256_file
from robust_train.models import Normalize, check_model, check_state_dict_compatible
from robust_train.schema import did_you_mean, raise_problems, relative_step_factor, to_float, validate_node
from robust_train.tracking.checkpoint import checksum_path, load_checkpoint, seed_everything
from robust_train.tracking.results import format_table, new_results, write_results
from robust_train.tracking.run_info import JobInfo, run_metadata, unique_name
from robust_train.tracking.wandb_run import build_tracker
from robust_train.training.ema import checkpoint_weights, with_weights
from robust_train.zoo import (
    NORMALIZATION_BUFFERS,
    ZOO_NUM_CLASSES,
    LoadedWeights,
    ModelZooConfig,
    WeightsKind,
    ZooModel,
    format_identity,
    load_into,
    load_weights,
    model_identity,
    preprocessing_dict,
    resolve_zoo_model,
)


def _chosen_groups(overrides: list[str]) -> tuple[set[str], list[Any]]:
    """Config groups chosen on the command line (`eval=quick`) and the `eval.attacks.*` key overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups: set[str] = set()
    attack_keys = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.key_or_group
        if "." not in key and key != "checkpoint" and not key.startswith("hydra"):
            groups.add(key)
        elif key.startswith("eval.attacks."):
            attack_keys.append(o)
    return groups, attack_keys


def _rescale_steps(
    threat: dict[str, Any], suite: dict[str, Any] | None, old_eps: float, new_eps: float
) -> None:
    """Absolute steps stored for the trained radius follow a new eval radius (relative ones already do).

    Only the run-wide step and the steps of suite attacks that inherit the run's eps change: an attack
    with its own `eps` keeps its own step.
    """
    ratio = new_eps / old_eps

    def scaled(value: Any) -> Any:
        return (
            value if relative_step_factor(value) is not None else f"{to_float(value, 'step') / old_eps!r}*eps"
        )

    if threat.get("step") is not None:
        threat["step"] = scaled(threat["step"])
    for node in ((suite or {}).get("attacks") or {}).values():
        if isinstance(node, dict) and node.get("step") is not None and node.get("eps") is None:
            if relative_step_factor(node["step"]) is None and isinstance(node["step"], int | float | str):
                node["step"] = to_float(node["step"], "step") * ratio


def _plain_dict(node: Any, resolve: bool = False) -> dict[str, Any]:
    """OmegaConf.to_container of a mapping node, typed as the dict it is."""
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=resolve))


def merged_config(cfg: DictConfig, state: dict[str, Any], overrides: list[str] | None = None) -> DictConfig:
    """The checkpoint's training config with this evaluation's choices laid over it.

    The suite is one whole: `eval=quick` on the command line replaces the stored suite (it is never
    merged key by key into it, which used to run the union of both under the new name); with no `eval`
    choice the suite the model was trained with runs, with this command's `eval.*` settings
    (n_examples, batch size, sanity, `eval.attacks.*` overrides) applied. A new `threat.eps` without a
    new `threat.step` rescales absolute steps with the radius.
    """
    base = OmegaConf.create(state.get("config") or {})
    if "model" not in base or "dataset" not in base:
        raise ConfigError(f"checkpoint={cfg.checkpoint} carries no training config; it cannot be rebuilt")
    groups, attack_keys = _chosen_groups(list(overrides or []))
    requested = _plain_dict(cfg.eval)
    stored = _plain_dict(base.eval) if base.get("eval") is not None else None
    use_stored = "eval" not in groups and isinstance(stored, dict) and bool(stored.get("attacks"))
    suite = requested
    if use_stored and stored is not None:
        suite = stored | {k: v for k, v in requested.items() if k not in ("attacks", "name")}
    overlay: dict[str, Any] = {
        "logger": OmegaConf.to_container(cfg.logger, resolve=False),
        "device": cfg.device,
        "seed": cfg.seed,
    }
    for key in ("model", "dataset", "threat"):
        node = cfg.get(key)
        values = {k: v for k, v in (_plain_dict(node) or {}).items() if v is not None}
        # A model override only counts with a name: width alone (e.g. from debug=fast) cannot apply
        # to trained weights.
        if values and (key != "model" or "name" in values):
            overlay[key] = values
    threat = _plain_dict(base.threat, resolve=True) if base.get("threat") is not None else {}
    new = overlay.get("threat") or {}
    if "eps" in new and "step" not in new and threat.get("eps") is not None:
        old_eps = to_float(threat["eps"], "threat.eps")
        new_eps = to_float(new["eps"], "threat.eps")
        if old_eps > 0 and new_eps != old_eps:
            _rescale_steps(threat, suite if use_stored else None, old_eps, new_eps)
            overlay["threat"] = threat | new
    base.eval = None  # replaced whole, never merged key by key
    model = overlay.get("model") or {}
    if "name" in model and model["name"] != base.model.get("name"):
        # Another architecture keeps the trained width and normalization, not the old one's options.
        base.model = {k: base.model.get(k) for k in ("width", "normalize") if k in base.model}
    merged = cast(DictConfig, OmegaConf.merge(base, overlay))  # a mapping merged over a mapping
    merged.eval = suite
    for o in attack_keys:
        if o.is_delete():
            OmegaConf.update(merged, o.key_or_group, None, force_add=True)
        else:
            OmegaConf.update(merged, o.key_or_group, o.value(), merge=True, force_add=True)
    OmegaConf.resolve(merged)
    return merged


# ---------------------------------------------------------------------------------------------------------
# Where the weights come from: our checkpoint, a RobustBench zoo file or a plain state_dict (zoo.py)

SOURCE_KEYS = ("checkpoint", "state_dict", "model_zoo.name")
# A folder of labelled images (data/image_folder.py): any model can be evaluated on images of its classes.
FOLDER_DATASET = "image_folder"
# The training config keys a foreign model's results keep: the rest (defense, trainer, add-ons) would
# describe a training run that never happened.
FOREIGN_CONFIG_KEYS = ("seed", "device", "threat", "dataset", "model", "eval", "logger")


@dataclass
class ModelSource:
    """The weights robust-eval evaluates and how to rebuild their model.

    `state` is our checkpoint, or for other weights a stand-in holding the config built for them
    (`config`) and epoch -1; `cfg` is the robust-eval config to lay over `state["config"]`.
    """

    kind: WeightsKind  # robust-train | robustbench | state_dict
    name: str
    path: Path
    state: dict[str, Any]
    cfg: DictConfig
    loaded: LoadedWeights | None = None
    zoo: ZooModel | None = None


def _given_keys(overrides: list[str]) -> set[str]:
    """Dotted keys set on the command line (`model.width=0.5`, `+model.width=0.5`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}


def _compose_run_config(overrides: list[str]) -> DictConfig:
    """robust-train's own composed config with `overrides`: a dataset preset, its threat model."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from robust_train.hydra_ext import CONFIG_DIR, install

    install()
    if GlobalHydra.instance().is_initialized():  # inside robust-eval: its search path (plugins, users)
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _foreign_base(dataset: str, model: dict[str, Any], threat: dict[str, Any] | None) -> dict[str, Any]:
    """The training config stand-in of foreign weights: the dataset preset, the model, no training."""
    from robust_train.data import dataset_names

    names = dataset_names()
    if dataset not in names:
        raise ConfigError(
            f"dataset.name={dataset!r} is not a known dataset{did_you_mean(dataset, names)}; "
            f"allowed: {', '.join(names)}"
        )
    base = _plain_dict(_compose_run_config([f"dataset={dataset}", "defense=standard"]), resolve=True)
    base["model"] = model
    base.pop("logger", None)  # this command's logger applies whole
    # Nothing is validated or trained: every training image stays in the (analysis) training split.
    base["dataset"]["val_size"] = 0
    if threat:
        base["threat"] = {**base["threat"], **threat}
    return base


def _foreign_cfg(cfg: DictConfig) -> DictConfig:
    """`cfg` without its `model` overlay (a foreign model node is built whole in `_foreign_base`)."""
    out = OmegaConf.create(_plain_dict(cfg))
    out.model = {}
    if out.get("dataset") is not None:
        out.dataset.pop("val_size", None)  # nothing is validated: no split is held out (debug=fast sets one)
    return out


def _model_overrides(cfg: DictConfig, given: set[str]) -> dict[str, Any]:
    """The `model.*` values this command sets; width only from the command line (not `debug=fast`'s)."""
    values = {k: v for k, v in (_plain_dict(cfg.get("model") or {}) or {}).items() if v is not None}
    if not given & {"model.width", "+model.width", "++model.width"}:
        values.pop("width", None)
    return values


def _zoo_source(cfg: DictConfig, given: set[str]) -> ModelSource:
    zoo_cfg = validate_node(ModelZooConfig, cfg.get("model_zoo"), "model_zoo")
    zoo = resolve_zoo_model(zoo_cfg)
    chosen = _model_overrides(cfg, given)
    refused = sorted(set(chosen) - {"width"})
    if refused:
        raise ConfigError(
            f"model.{refused[0]} cannot be set for model_zoo.name={zoo.name}: its architecture "
            f"({zoo.model['name']}) and preprocessing come from the zoo {zoo.described_by}"
        )
    dataset_node = cfg.get("dataset") or {}
    dataset = dataset_node.get("name") or zoo.dataset
    if dataset not in (zoo.dataset, FOLDER_DATASET):
        raise ConfigError(
            f"dataset.name={dataset} but model_zoo.dataset={zoo.dataset}: a zoo model is evaluated on its "
            f"own dataset or on images of its classes (dataset.name={FOLDER_DATASET})"
        )
    for key in ("mean", "std"):
        if dataset_node.get(key) is not None:
            raise ConfigError(
                f"dataset.{key} cannot be set for model_zoo.name={zoo.name}: its preprocessing is fixed"
            )
    loaded = load_weights(zoo.path)
    base = _foreign_base(dataset, {**zoo.model, **chosen}, {"norm": zoo.norm, "eps": zoo.eps})
    if dataset == FOLDER_DATASET:  # the zoo dataset's classes and image size
        base["dataset"]["num_classes"] = ZOO_NUM_CLASSES[zoo.dataset]
        base["dataset"]["image_shape"] = [3, 32, 32]
    if zoo.normalize == "meanstd" and zoo.mean is not None and zoo.std is not None:
        base["dataset"]["mean"], base["dataset"]["std"] = list(zoo.mean), list(zoo.std)
    state = {"config": base, "epoch": -1}
    return ModelSource("robustbench", zoo.name, zoo.path, state, _foreign_cfg(cfg), loaded, zoo)


def _state_dict_source(cfg: DictConfig, given: set[str]) -> ModelSource:
    path = Path(str(cfg.state_dict))
    chosen = _model_overrides(cfg, given)
    missing = [k for k in ("name", "normalize") if k not in chosen]
    dataset = (cfg.get("dataset") or {}).get("name")
    if missing or dataset is None:
        needs = [f"model.{k}" for k in missing] + (["dataset.name"] if dataset is None else [])
        raise ConfigError(
            f"state_dict={path} needs {', '.join(needs)}: a weights file does not say its architecture, "
            "its input preprocessing (model.normalize=meanstd: (x - dataset mean) / std inside the model; "
            "none: [0, 1] pixels as they are) or its dataset, e.g. state_dict=w.pt model.name=wrn34_10 "
            "model.normalize=none dataset.name=cifar10"
        )
    node = cfg.get("dataset") or {}
    if dataset == FOLDER_DATASET and chosen["normalize"] == "meanstd" and node.get("mean") is None:
        raise ConfigError(
            f"state_dict={path} with model.normalize=meanstd on dataset.name={FOLDER_DATASET} needs "
            "dataset.mean=[...] and dataset.std=[...]: the statistics the weights were trained with (the "
            "folder's own would be the wrong normalization)"
        )
    loaded = load_weights(path)
    if loaded.kind == "robust-train":
        raise ConfigError(
            f"state_dict={path} is a robust-train checkpoint: evaluate it with checkpoint={path}, which "
            "rebuilds the model from its own config"
        )
    state = {"config": _foreign_base(str(dataset), chosen, None), "epoch": -1}
    return ModelSource("state_dict", path.stem, path, state, _foreign_cfg(cfg), loaded)


def model_source(cfg: DictConfig, overrides: list[str]) -> ModelSource:
    """The one model source `cfg` names: checkpoint=, state_dict= or model_zoo.name= (one line otherwise)."""
    zoo_node = cfg.get("model_zoo") or {}
    chosen = [
        key for key, value in (("checkpoint", cfg.get("checkpoint")), ("state_dict", cfg.get("state_dict")),
                               ("model_zoo.name", zoo_node.get("name")))
        if value is not None
    ]  # fmt: skip
    if not chosen:
        raise ConfigError(
            "checkpoint is required: robust-eval checkpoint=outputs/.../best.pt, or someone else's weights "
            "with state_dict=<file> model.name=<arch> model.normalize=none|meanstd dataset.name=<dataset>, "
            "or model_zoo.name=<RobustBench name> model_zoo.dir=<models dir>"
        )
    if len(chosen) > 1:
        raise ConfigError(
            f"{' and '.join(chosen)} are both set: give one model source ({', '.join(SOURCE_KEYS)})"
        )
    if chosen[0] != "checkpoint" and str(cfg.get("weights") or "auto") != "auto":
        raise ConfigError(f"weights={cfg.get('weights')} applies to robust-train checkpoints only")
    given = _given_keys(overrides)
    if chosen[0] == "model_zoo.name":
        return _zoo_source(cfg, given)
    if chosen[0] == "state_dict":
        return _state_dict_source(cfg, given)
    path = checkpoint_file(str(cfg.checkpoint))  # a run directory means its best.pt
    return ModelSource("robust-train", f"{path.parent.name}/{path.stem}", path, load_checkpoint(path), cfg)


def _checkpoint_sha256(path: Path) -> str:
    """Our checkpoint's SHA-256: its sidecar (load_checkpoint verified the file against it), else computed."""
    sidecar = checksum_path(path)
    if sidecar.is_file():
        digest = sidecar.read_text().split()[:1]
        if digest and len(digest[0]) == 64:
            return digest[0]
    return sha256_file(path)


def _architecture(node: Any) -> dict[str, Any]:
    """The validated `model` node: the name and every builder option, defaults filled in."""
    cfg, problems = check_model(node)
    raise_problems(problems)
    assert cfg is not None
    return {"name": cfg.name, **cfg.options()}


def _model_preprocessing(model: Any) -> dict[str, Any]:
    """What the built model does to its [0, 1] input, read from the model itself."""
    norm = getattr(model, "normalize", None)
    if isinstance(norm, Normalize):
        return preprocessing_dict("meanstd", norm.mean.flatten().tolist(), norm.std.flatten().tolist())
    if isinstance(norm, nn.Identity):
        return preprocessing_dict("none", None, None)
    return {"input": "[0, 1] RGB", "normalize": "defined by the model"}


def _check_file_normalization(source: ModelSource, preprocessing: dict[str, Any]) -> None:
    """A file that carries its normalization buffers must agree with the preprocessing we apply."""
    found = (source.loaded.meta.get("normalization") if source.loaded else None) or {}
    for mean_key, std_key in NORMALIZATION_BUFFERS:
        if mean_key not in found:
            continue
        ours_mean, ours_std = preprocessing.get("mean"), preprocessing.get("std")
        theirs = found[mean_key] + found[std_key]
        ours = (ours_mean or []) + (ours_std or [])
        same = len(theirs) == len(ours) and all(abs(a - b) < 1e-4 for a, b in zip(theirs, ours, strict=True))
        if not same:
            raise CheckpointError(
                f"{source.path} carries normalization buffers {mean_key}={found[mean_key]} "
                f"{std_key}={found[std_key]}, but the model is built with preprocessing "
                f"{preprocessing.get('normalize')} {ours_mean or ''} {ours_std or ''}".rstrip()
            )


def load_source_weights(source: ModelSource, model: Any) -> list[str]:
    """Load a foreign source's weights into `model` (key conventions adapted); the changes made."""
    assert source.loaded is not None
    label = "state_dict" if source.kind == "state_dict" else "model_zoo"
    return load_into(model, source.loaded, f"{label}: {source.path}")


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def training_run_link(source: ModelSource) -> dict[str, Any]:
    """The W&B run that trained a robust-train checkpoint: id, name and group, from the checkpoint (or
    the results.json beside it, for checkpoints written before the checkpoint carried them)."""
    if source.kind != "robust-train":
        return {}
    link = dict(source.state.get("wandb") or {})
    link.setdefault("run_id", source.state.get("wandb_run_id"))
    if not link.get("group") or not link.get("name"):
        try:
            beside = json.loads((source.path.parent / "results.json").read_text()).get("wandb") or {}
        except (OSError, ValueError, AttributeError):
            beside = {}
        for key in ("run_id", "group", "name"):
            if not link.get(key) and beside.get(key):
                link[key] = beside[key]
    return {k: link.get(k) for k in ("run_id", "name", "group")}


def evaluate_checkpoint(
    cfg: DictConfig,
    out_dir: Path,
    group: str | None = None,
    overrides: list[str] | None = None,
    job: JobInfo | None = None,
) -> dict[str, Any]:
    """Rebuild the checkpoint's model, run the eval suite on the test set, write out_dir/results.json.

    `overrides` are the command line's Hydra overrides (read from Hydra when None): they tell a chosen
    `eval=` suite from the default one. The W&B run joins the group of the run that trained the model,
    with the checkpoint's path, kind and training run in its config (`checkpoint`, `train_run`).
    """
    validate_eval_config(cfg)
    analysis_names = validate_analysis(cfg.get("analysis"), cfg.get("analysis_options"))
    overrides = _command_line_overrides() if overrides is None else overrides
    source = model_source(cfg, overrides)
    if source.kind != "robust-train" and "robust_overfitting" in analysis_names:
        raise ConfigError(
            f"analysis robust_overfitting needs a training run's best.pt and last.pt, not {source.kind} "
            "weights"
        )
    state = source.state
    full = merged_config(source.cfg, state, overrides)
    validate_train_config(full)
    device = resolve_device(full.get("device"))
    seed = int(full.seed)
    seed_everything(seed)
    data = build_dataset(full.dataset, seed).to(device)
    model = model_from_config(full.model, data).to(device)
    preprocessing = _model_preprocessing(model)
    which: str | None = None
    extra: dict[str, Any] = {}
    if source.kind == "robust-train":
        # `weights=auto|trained|ema`: best.pt of an EMA run and ema.pt are evaluated with the averaged
        # weights.
        weights, which = checkpoint_weights(state, str(cfg.get("weights") or "auto"), cfg.checkpoint)
        check_state_dict_compatible(model, weights, str(cfg.checkpoint))
        model.load_state_dict(weights)
    else:
        _check_file_normalization(source, preprocessing)
        extra["key_changes"] = load_source_weights(source, model)
        if source.zoo is not None:
            extra["zoo"] = {"dataset": source.zoo.dataset, "threat_model": source.zoo.threat_model,
                            "described_by": source.zoo.described_by}  # fmt: skip
    identity = model_identity(
        source.kind, source.name, source.path, source.loaded.meta["sha256"] if source.loaded else
        _checkpoint_sha256(source.path), _architecture(full.model), preprocessing, **extra,
    )  # fmt: skip
    print(format_identity(identity), flush=True)
    threat = threat_from_config(full.threat)
    # Add-ons that change how the trained model predicts (e.g. LAD's noisy ensemble) apply here too.
    addons = build_addons(
        full,
        {"model": model, "defense": build_defense(full.defense, threat), "threat": threat,
         "num_classes": data.num_classes, "seed": seed},
    )  # fmt: skip
    for addon in addons:
        addon_state = (state.get("addons") or {}).get(addon.name)
        if addon_state:
            addon.load_state_dict(addon_state)
    # `model` stays the plain network (the analysis hooks need its layers); the setup wraps it.
    out_dir = Path(out_dir)
    setup = EvalSetup.from_config(full.eval, threat, data, seed, addons=addons, state_dir=out_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    config = numeric_config(_plain_dict(full, resolve=True))
    if source.kind != "robust-train":
        config = {k: v for k, v in config.items() if k in FOREIGN_CONFIG_KEYS}
    kind = source.path.stem if source.kind == "robust-train" else source.kind
    trained_by = training_run_link(source)
    suite = str(full.eval.get("name") or "eval")
    base_name = (
        f"eval {suite} {kind}: {trained_by.get('name') or source.path.parent.name}"
        if source.kind == "robust-train" else f"eval {suite}: {source.kind} {source.name}"
    )  # fmt: skip
    info = run_metadata(job, out_dir, device, model)
    link = {"checkpoint": str(source.path.resolve()), "checkpoint_kind": kind, "train_run": trained_by}
    tags = [f"dataset:{full.dataset.name}", f"model:{full.model.name}", "eval", f"source:{source.kind}"]
    if source.kind == "robust-train":
        tags += [t for t in run_tags(full) if t not in tags]
    elif source.kind == "robustbench":
        tags.append(f"zoo:{source.name}")
    setup.tracker = build_tracker(
        full.logger,
        out_dir,
        {**config, **link, "model_identity": identity, "run": info},
        name=unique_name(base_name, job),
        # Beside the run that trained the model (its sweep, or its own name for a single run).
        group=trained_by.get("group") or group,
        tags=tags,
    )
    setup.tracker.use_checkpoint(trained_by.get("run_id"), kind)
    results = new_results(config, seed, str(device), out_dir)
    results["model"] = identity
    results["checkpoint"] = str(source.path)
    results["run"] = info
    results["train_run"] = trained_by
    results["wandb"] = {"run_id": setup.tracker.run_id, "group": setup.tracker.group}
    try:
        entry = evaluate_model(setup, model, kind, int(state.get("epoch", -1)), source.path)
        if which is not None:
            entry = with_weights(entry, which)
        results["eval"] = {**setup.header(), kind: entry}
        write_results(results, out_dir / "results.json")
        if analysis_names:
            results["analysis"] = run_analysis(
                model, analysis_names, cfg.get("analysis_options"), setup.attacks,
                (data.train_x, data.train_y), (setup.x, setup.y), data.num_classes, out_dir, kind,
                setup.batch_size, seed,
            )  # fmt: skip
            if "robust_overfitting" in analysis_names:
                found = evaluate_sibling(setup, model, cfg.checkpoint, entry["epoch"], which)
                if found is not None:
                    results["eval"][found[0]] = found[1]
                results["eval"]["gap"] = suite_gap(results["eval"])
            write_results(results, out_dir / "results.json")
            log_analysis(setup.tracker, results["analysis"])
        log_evaluation(setup.tracker, results["eval"])
    except (SystemExit, KeyboardInterrupt):
        setup.tracker.finish(exit_code=130)
        raise
    except BaseException as err:
        setup.tracker.fail(f"{type(err).__name__}: {err}", traceback.format_exc(limit=-8))
        raise
    setup.tracker.finish(exit_code=0)
    print(format_identity(identity), flush=True)
    print(format_table(results["eval"]), flush=True)
    for text in (format_gap(results["eval"].get("gap")), format_analysis(results.get("analysis") or {})):
        if text:
            print(text, flush=True)
    print(f"results: {out_dir / 'results.json'}", flush=True)
    return results
