"""A whole training run: build, train (or resume), evaluate best and last, write results.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from robust_train.addons import build_addons, selected
from robust_train.attacks import ThreatModel
from robust_train.builders import (
    fast_path_from_config,
    model_from_config,
    optimizer_from_config,
    threat_from_config,
)
from robust_train.config import numeric_config, resolve_device, validate_train_config
from robust_train.data import DataBundle, build_dataset, check_training_data
from robust_train.defenses import build_defense
from robust_train.errors import CheckpointError
from robust_train.evaluation.analysis import format_gap, suite_gap
from robust_train.evaluation.evaluate import EvalSetup, evaluate_model, log_evaluation
from robust_train.models import check_state_dict_compatible
from robust_train.models.init import initialize_from
from robust_train.schema import validate_node
from robust_train.tracking.checkpoint import load_checkpoint, resumable_checkpoint, seed_everything
from robust_train.tracking.results import format_table, new_results, read_results, write_results
from robust_train.tracking.wandb_run import Tracker, build_tracker
from robust_train.training.callbacks import InstanceTracking
from robust_train.training.ema import EMAConfig, checkpoint_weights, with_weights
from robust_train.training.trainer import Trainer


def defense_label(cfg: DictConfig) -> str:
    """The defense's name, with `_awp` when the weight perturbation is on (e.g. trades_awp)."""
    awp = cfg.defense.get("awp")
    return cfg.defense.name + ("_awp" if awp and awp.get("enabled") else "")


def run_name(cfg: DictConfig) -> str:
    addons = "".join(f"+{name}" for name, _ in selected(cfg))
    return cfg.get("name") or f"{cfg.dataset.name}-{cfg.model.name}-{defense_label(cfg)}{addons}-s{cfg.seed}"


def run_tags(cfg: DictConfig) -> list[str]:
    tags = [f"dataset:{cfg.dataset.name}", f"model:{cfg.model.name}", f"defense:{defense_label(cfg)}"]
    return tags + [f"addon:{name}" for name, _ in selected(cfg)]


def _check_resume_compatible(state: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """Refuse to resume a run directory whose last.pt was trained with another model or dataset."""
    old = state.get("config") or {}
    for group, keys in (("model", ("name", "width", "normalize")), ("dataset", ("name",))):
        for key in keys:
            before, now = (old.get(group) or {}).get(key), cfg[group].get(key)
            if before != now:
                raise CheckpointError(
                    f"{path} was written by a run with {group}.{key}={before!r}, but this run has "
                    f"{group}.{key}={now!r}; resume with the same {group} or choose a new hydra.run.dir"
                )


def evaluate_checkpoints(
    cfg: DictConfig,
    trainer: Trainer,
    data: DataBundle,
    threat: ThreatModel,
    tracker: Tracker,
) -> dict[str, Any]:
    """The eval suite on the test set for each checkpoint kind in `eval.checkpoints` (best, last), and
    `ema` (ema.pt, the averaged weights at the end) when weight averaging is on and `ema.evaluate`.

    Each entry says which weights it evaluated (`weights: trained|ema`): best.pt of an EMA run is
    evaluated with its averaged weights (it was selected on them), last.pt with the trained ones.
    """
    setup = EvalSetup.from_config(
        cfg.eval, threat, data, int(cfg.seed), addons=trainer.addons, state_dir=trainer.run_dir,
        progress=bool(cfg.trainer.get("progress", True)), tracker=tracker,
    )  # fmt: skip
    out: dict[str, Any] = setup.header()
    # (epoch, weights) -> the checkpoint kind already evaluated with those weights
    evaluated: dict[tuple[int, str], str] = {}
    kinds = list(cfg.eval.get("checkpoints") or ["last"])
    ema = validate_node(EMAConfig, cfg.get("ema"), "ema")
    if ema.enabled and ema.evaluate and "ema" not in kinds:
        kinds.append("ema")
    for kind in kinds:
        path = trainer.run_dir / f"{kind}.pt"
        if not resumable_checkpoint(path):
            continue
        state = load_checkpoint(path, map_location=data.test_x.device, fallback=True)
        epoch = int(state["epoch"])
        weights, which = checkpoint_weights(state, where=path)
        if (epoch, which) in evaluated:
            # Checkpoints of the same epoch and weights (best.pt and last.pt, or best.pt and ema.pt of
            # an EMA run) hold the same tensors: evaluate once.
            first = evaluated[(epoch, which)]
            out[kind] = {**out[first], "checkpoint": str(path), "same_as": first}
            continue
        trainer.model.load_state_dict(weights)
        # Example images go to W&B for the first evaluated checkpoint only.
        entry = evaluate_model(setup, trainer.model, kind, epoch, path, examples=not evaluated)
        out[kind] = with_weights(entry, which)
        evaluated[(epoch, which)] = kind
    # Leave the model as the run ended.
    trainer.model.load_state_dict(load_checkpoint(trainer.run_dir / "last.pt", fallback=True)["model"])
    return out


def train_run(cfg: DictConfig, run_dir: Path, group: str | None = None) -> dict[str, Any]:
    """Train, resume or finish the run in `run_dir`; returns the results written to results.json."""
    validate_train_config(cfg)
    check_training_data(cfg.dataset)  # extra files, a training split: what robust-eval does not need
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.get("device"))
    seed = int(cfg.seed)
    # The checkpoint keeps the config as written (eps/4 stays relative, so robust-eval at another eps
    # rescales it); results.json and W&B get the numbers each attack used.
    config = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    numbers = numeric_config(config)

    resume_state = None
    last = run_dir / "last.pt"
    if cfg.trainer.get("resume", True) and resumable_checkpoint(last):
        # A corrupt or missing last.pt (hard kill, disk error) falls back to last.prev.pt with a warning.
        resume_state = load_checkpoint(last, fallback=True)
        if (run_dir / "results.json").exists():
            read_results(run_dir / "results.json")  # refuses a results file of another format version
        _check_resume_compatible(resume_state, cfg, last)

    seed_everything(seed)
    data = build_dataset(cfg.dataset, seed).to(device)
    model = model_from_config(cfg.model, data).to(device)
    init_from = initialize_from(cfg.model, model, resume_state, numbers)  # model.init_from, not on resume
    fast = fast_path_from_config(cfg.trainer.get("fast"), device)
    fast.prepare_model(model)  # channels_last and in-place compile; state_dict keys are unchanged
    threat = threat_from_config(cfg.threat)
    defense = build_defense(cfg.defense, threat)
    addons = build_addons(
        cfg,
        {"model": model, "defense": defense, "threat": threat, "num_classes": data.num_classes, "seed": seed},
    )
    optimizer = optimizer_from_config(cfg.trainer.optimizer, model, device, fused=fast.fused_sgd)
    if resume_state is not None:
        check_state_dict_compatible(model, resume_state["model"], str(last))
    instance_tracking = InstanceTracking.from_config(cfg, run_dir, data, threat)  # opt-in, None when off

    tracker = build_tracker(
        cfg.logger,
        run_dir,
        numbers,
        name=run_name(cfg),
        group=group,
        tags=run_tags(cfg),
        resume_id=resume_state.get("wandb_run_id") if resume_state else None,
    )
    results = new_results(numbers, seed, str(device), run_dir)
    results["wandb"] = {"run_id": tracker.run_id, "group": tracker.group}
    results_path = run_dir / "results.json"
    meta = {
        "config": config,
        "init_from": init_from,
        "num_classes": data.num_classes,
        "mean": list(data.mean),
        "std": list(data.std),
        "image_shape": list(data.image_shape),
    }

    def record_epoch(_: dict[str, Any]) -> None:
        results["train"] = {
            "epochs_completed": trainer.epoch,
            "best": trainer.best,
            "history": trainer.history,
        }
        write_results(results, results_path)

    trainer = Trainer(
        cfg, run_dir, data, model, defense, optimizer, threat, addons=addons,
        tracker=tracker, checkpoint_extra=meta, on_epoch_end=record_epoch,
        callbacks=[instance_tracking] if instance_tracking is not None else [],
    )  # fmt: skip
    print(f"run dir: {run_dir}\ndata: {data.summary()}\ndevice: {device}", flush=True)
    try:
        if resume_state is not None:
            trainer.load_state_dict(resume_state)
            print(f"resumed from {last} after epoch {trainer.epoch}", flush=True)
        trainer.fit()
        record_epoch({})
        if instance_tracking is not None:
            plot = instance_tracking.finish(tracker)
            tracked = {"file": str(instance_tracking.path), "plot": plot and str(plot)}
            results["train"]["instance_tracking"] = tracked
        results["eval"] = evaluate_checkpoints(cfg, trainer, data, threat, tracker)
        gap = suite_gap(results["eval"])
        if gap is not None:
            results["eval"]["gap"] = gap  # robust overfitting: best minus last, per attack
        log_evaluation(tracker, results["eval"])
        write_results(results, results_path)
    except BaseException as err:
        if isinstance(err, SystemExit):
            # A stop signal (submitit requeues a preempted/timed-out job by exiting from its handler):
            # the run resumes later into the same W&B run, so it is preempted, not failed.
            tracker.mark_preempting()
        tracker.finish(exit_code=1)
        raise
    print(format_table(results["eval"]), flush=True)
    if format_gap(results["eval"].get("gap")):
        print(format_gap(results["eval"].get("gap")), flush=True)
    print(f"results: {results_path}", flush=True)
    kinds = ("best", "last", *(["ema"] if "ema" in results["eval"] else []))
    for kind in kinds:  # W&B model artifact versions with aliases (logger.log_checkpoints)
        tracker.log_checkpoint(run_dir / f"{kind}.pt", aliases=[kind])
    tracker.finish(exit_code=0)
    return results
