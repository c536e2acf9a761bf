"""A whole training run: build, train (or resume), evaluate best and last, write results.json."""

from __future__ import annotations

import traceback
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
from robust_train.tracking.checkpoint import (
    load_checkpoint,
    load_newest_checkpoint,
    resumable_checkpoint,
    seed_everything,
)
from robust_train.tracking.results import format_table, new_results, read_results, write_results
from robust_train.tracking.run_info import JobInfo, run_metadata, unique_name
from robust_train.tracking.wandb_run import Tracker, build_tracker, earlier_run_id
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


def _same_run(stored: dict[str, Any], numbers: dict[str, Any]) -> bool:
    """Whether a stored run config trained what this config trains and asked for the same evaluation."""

    def key(config: dict[str, Any]) -> Any:
        suite = {k: v for k, v in (config.get("eval") or {}).items() if k != "force"}
        # Where the data lives may differ between machines; what it is may not.
        data = {k: v for k, v in (config.get("dataset") or {}).items() if k not in ("root", "download")}
        trained = [data] + [config.get(k) for k in ("seed", "model", "defense", "addons", "ema")]
        return suite, config.get("threat"), trained

    return bool(key(stored) == key(numbers))


def finished_results(cfg: DictConfig, run_dir: Path, numbers: dict[str, Any]) -> dict[str, Any] | None:
    """results.json of a run in `run_dir` that has nothing left to do, else None.

    Finished means: every epoch asked for was trained, and each requested checkpoint kind was evaluated
    with the suite and radius this config asks for. A longer `trainer.epochs`, another suite or another
    eps is work left to do; `eval.force=true` evaluates again anyway.
    """
    path = run_dir / "results.json"
    if cfg.eval.get("force") or not cfg.trainer.get("resume", True) or not path.is_file():
        return None
    try:
        results = read_results(path)
    except Exception:  # noqa: BLE001 - an unreadable file is refused on the resume path, with its reason
        return None
    done = int((results.get("train") or {}).get("epochs_completed") or 0)
    evaluation = results.get("eval") or {}
    kinds = list(cfg.eval.get("checkpoints") or ["last"])
    evaluated = all(k in evaluation or not resumable_checkpoint(run_dir / f"{k}.pt") for k in kinds)
    if done < int(cfg.trainer.epochs) or not evaluation or not evaluated:
        return None
    if not _same_run(results.get("config") or {}, numbers):
        return None
    return results


def best_summary(trainer: Trainer) -> dict[str, Any]:
    """W&B summary values of the selected (best) epoch: `best_epoch` and every metric of that epoch.

    W&B's own summary keeps the last value of each metric (or a max from any epoch), which is not the
    checkpoint best.pt holds.
    """
    epoch = trainer.best.get("epoch")
    if epoch is None:
        return {}
    record = next((r for r in trainer.history if r.get("epoch") == epoch), {})
    return {"best_epoch": epoch} | {f"best/{k}": v for k, v in record.items() if k != "epoch"}


def run_tags(cfg: DictConfig) -> list[str]:
    tags = [f"dataset:{cfg.dataset.name}", f"model:{cfg.model.name}", f"defense:{defense_label(cfg)}"]
    return tags + [f"addon:{name}" for name, _ in selected(cfg)]


# What a resumed run may change: how long it trains, how it is evaluated and logged, where files are, and
# the weight average (it is switched on or off at resume by design; the trained weights are the same).
# Anything else under these nodes defines what the weights in last.pt were trained with.
_TRAINED_NODES = ("seed", "model", "dataset", "threat", "defense", "addons", "ema", "trainer")
_MAY_CHANGE = (
    "model.init_from", "dataset.root", "dataset.download", "dataset.extra", "dataset.test_limit",
    "ema", "trainer.epochs", "trainer.progress", "trainer.resume", "trainer.log_every",
    "trainer.fast", "trainer.validation", "trainer.stop_signals", "trainer.nan", "trainer.instance_tracking",
    "trainer.max_batches",
)  # fmt: skip


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _addon_names(config: dict[str, Any]) -> list[str]:
    node = config.get("addons") or {}
    return sorted(k for k, v in node.items() if isinstance(v, dict) and v.get("enabled", True))


def _check_resume_compatible(state: dict[str, Any], numbers: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run directory whose last.pt was trained with another config.

    Continuing its weights under another defense, radius or model would train a mix that results.json
    and W&B then describe as the new config. Keys a run may change on resume (`_MAY_CHANGE`) and keys
    the checkpoint's config does not have (written by an older version) are not compared.
    """
    old_config = numeric_config(state.get("config") or {})
    old = _leaves({k: v for k, v in old_config.items() if k in _TRAINED_NODES})
    new = _leaves({k: v for k, v in numbers.items() if k in _TRAINED_NODES})
    # Add-ons come and go as whole nodes: keys of one side only would not be compared.
    old["addons"], new["addons"] = _addon_names(old_config), _addon_names(numbers)
    differ = [
        key for key in old.keys() & new.keys()
        if old[key] != new[key] and not any(key == m or key.startswith(m + ".") for m in _MAY_CHANGE)
    ]  # fmt: skip
    if not differ:
        return
    # Name the choice the user made (defense.name, threat.eps) before the values derived from it.
    chosen = [k for k in differ if k.endswith(".name") or k == "addons"]
    key = min(chosen or [k for k in differ if k.startswith("threat.")] or differ)
    more = f" (and {len(differ) - 1} more key{'s' if len(differ) > 2 else ''})" if len(differ) > 1 else ""
    raise CheckpointError(
        f"{path} was written by a run with {key}={old[key]!r}, but this run has {key}={new[key]!r}{more}: "
        "resuming would go on training those weights under another config. Resume with the run's own "
        "config (only trainer.epochs, eval.*, logger.* and paths may change) or choose a new hydra.run.dir"
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


def train_run(
    cfg: DictConfig, run_dir: Path, group: str | None = None, job: JobInfo | None = None
) -> dict[str, Any]:
    """Train, resume or finish the run in `run_dir`; returns the results written to results.json.

    `group` is the W&B group (the sweep's name in a multirun, else the run's name); `job` says which
    overrides this Hydra job has and which keys its sweep varies (they go into the W&B name).
    A finished run is not evaluated again (`eval.force=true` does): its results are printed.
    """
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

    finished = finished_results(cfg, run_dir, numbers)
    if finished is not None:
        epochs = (finished.get("train") or {}).get("epochs_completed")
        print(
            f"{run_dir} finished: {epochs} epochs trained and evaluated; its results follow "
            "(eval.force=true evaluates again)",
            flush=True,
        )
        print(format_table(finished["eval"]), flush=True)
        print(f"results: {run_dir / 'results.json'}", flush=True)
        return finished

    resume_state = None
    last = resumed_from = run_dir / "last.pt"
    if cfg.trainer.get("resume", True) and resumable_checkpoint(last):
        # A corrupt or missing last.pt (hard kill, disk error) falls back to last.prev.pt with a warning.
        resume_state, resumed_from = load_newest_checkpoint(last)
        if (run_dir / "results.json").exists():
            read_results(run_dir / "results.json")  # refuses a results file of another format version
        _check_resume_compatible(resume_state, numbers, resumed_from)

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

    # The default name shows the seed (-s0); a chosen `name=` does not.
    name = unique_name(run_name(cfg), job, in_base=() if cfg.get("name") else ("seed",))
    # The checkpoint's W&B run; without one, that of an attempt stopped before its first checkpoint.
    wandb_id = resume_state.get("wandb_run_id") if resume_state else None
    if resume_state is None and cfg.trainer.get("resume", True):
        wandb_id = earlier_run_id(cfg.logger, run_dir)
    info = run_metadata(job, run_dir, device, model)
    tracker = build_tracker(
        cfg.logger,
        run_dir,
        {**numbers, "run": info},
        name=name,
        # A single run is its own group, which its robust-eval runs join.
        group=group or name,
        tags=run_tags(cfg),
        resume_id=wandb_id,
    )
    if resume_state is not None:
        tracker.summary({"error": None})  # an earlier attempt's failure is history once the run resumes
    results = new_results(numbers, seed, str(device), run_dir)
    results["run"] = info
    # The group even without W&B (logger=none): a later robust-eval with W&B joins it.
    results["wandb"] = {"run_id": tracker.run_id, "group": tracker.group or group or name, "name": name}
    results_path = run_dir / "results.json"
    meta = {
        "config": config,
        "wandb": results["wandb"],
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
        tracker.summary(best_summary(trainer) | {"epochs_completed": trainer.epoch})

    trainer = Trainer(
        cfg, run_dir, data, model, defense, optimizer, threat, addons=addons,
        tracker=tracker, checkpoint_extra=meta, on_epoch_end=record_epoch,
        callbacks=[instance_tracking] if instance_tracking is not None else [],
    )  # fmt: skip
    if job is not None and job.multirun and job.sweep_dir:
        trainer.resume_hint = (
            f"Rerun the sweep's command with hydra.sweep.dir={job.sweep_dir} to resume its unfinished jobs"
        )
    print(f"run dir: {run_dir}\ndata: {data.summary()}\ndevice: {device}", flush=True)
    try:
        if resume_state is not None:
            trainer.load_state_dict(resume_state)
            print(f"resumed from {resumed_from} after epoch {trainer.epoch}", flush=True)
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
    except (SystemExit, KeyboardInterrupt) as err:
        # A stop signal or Ctrl-C (submitit requeues a preempted/timed-out job by exiting from its
        # handler): the run resumes later into the same W&B run, so it is preempted, not failed.
        tracker.mark_preempting()
        code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 130
        tracker.finish(exit_code=code or 1)
        raise
    except BaseException as err:
        message = f"{type(err).__name__}: {err}"
        tracker.fail(message, traceback.format_exc(limit=-8))
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
