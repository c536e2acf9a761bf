"""`robust-eval`: evaluate a saved checkpoint with an eval suite and write results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from robust_train.addons import build_addons
from robust_train.builders import model_from_config, threat_from_config
from robust_train.config import (
    numeric_config,
    resolve_device,
    validate_eval_config,
    validate_train_config,
)
from robust_train.data import build_dataset
from robust_train.defenses import build_defense
from robust_train.errors import ConfigError
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
from robust_train.models import check_state_dict_compatible
from robust_train.schema import relative_step_factor, to_float
from robust_train.tracking.checkpoint import load_checkpoint, seed_everything
from robust_train.tracking.results import format_table, new_results, write_results
from robust_train.tracking.wandb_run import build_tracker


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


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def evaluate_checkpoint(
    cfg: DictConfig, out_dir: Path, group: str | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Rebuild the checkpoint's model, run the eval suite on the test set, write out_dir/results.json.

    `overrides` are the command line's Hydra overrides (read from Hydra when None): they tell a chosen
    `eval=` suite from the default one.
    """
    validate_eval_config(cfg)
    analysis_names = validate_analysis(cfg.get("analysis"), cfg.get("analysis_options"))
    state = load_checkpoint(cfg.checkpoint)
    full = merged_config(cfg, state, _command_line_overrides() if overrides is None else overrides)
    validate_train_config(full)
    device = resolve_device(full.get("device"))
    seed = int(full.seed)
    seed_everything(seed)
    data = build_dataset(full.dataset, seed).to(device)
    model = model_from_config(full.model, data).to(device)
    check_state_dict_compatible(model, state["model"], str(cfg.checkpoint))
    model.load_state_dict(state["model"])
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
    setup.tracker = build_tracker(
        full.logger,
        out_dir,
        config,
        name=f"eval-{Path(str(cfg.checkpoint)).parent.name}-{Path(str(cfg.checkpoint)).stem}",
        group=group,
        tags=[f"dataset:{full.dataset.name}", f"model:{full.model.name}", "eval"],
    )
    results = new_results(config, seed, str(device), out_dir)
    results["checkpoint"] = str(cfg.checkpoint)
    kind = Path(str(cfg.checkpoint)).stem
    try:
        entry = evaluate_model(setup, model, kind, int(state.get("epoch", -1)), cfg.checkpoint)
        results["eval"] = {**setup.header(), kind: entry}
        write_results(results, out_dir / "results.json")
        if analysis_names:
            results["analysis"] = run_analysis(
                model, analysis_names, cfg.get("analysis_options"), setup.attacks,
                (data.train_x, data.train_y), (setup.x, setup.y), data.num_classes, out_dir, kind,
                setup.batch_size, seed,
            )  # fmt: skip
            if "robust_overfitting" in analysis_names:
                found = evaluate_sibling(setup, model, cfg.checkpoint, entry["epoch"])
                if found is not None:
                    results["eval"][found[0]] = found[1]
                results["eval"]["gap"] = suite_gap(results["eval"])
            write_results(results, out_dir / "results.json")
            log_analysis(setup.tracker, results["analysis"])
        log_evaluation(setup.tracker, results["eval"])
    except BaseException:
        setup.tracker.finish(exit_code=1)
        raise
    setup.tracker.finish(exit_code=0)
    print(format_table(results["eval"]), flush=True)
    for text in (format_gap(results["eval"].get("gap")), format_analysis(results.get("analysis") or {})):
        if text:
            print(text, flush=True)
    print(f"results: {out_dir / 'results.json'}", flush=True)
    return results
