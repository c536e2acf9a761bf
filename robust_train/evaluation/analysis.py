"""Layer-wise analysis of a trained model: `robust-eval checkpoint=... analysis=[...]` (issue 5, item 4).

- `clustering`: clustering-effect accuracy per layer (SAT Def. 1 / Eq. 2, SLIM Table 5). Class centroids
  of each layer's flattened output come from the clean *training* images; a test input's cluster label
  is the class of the nearest centroid (argmin, L2 by default); the accuracy is measured on clean test
  images and on adversarial ones crafted by the suite's attacks against the classifier output.
- `hessian_trace`: Hutchinson estimate of Tr(H_m), the trace of the CE Hessian block of each module's
  parameters (docs/methods/slim.md#hessian-trace, HAWQ-V2 style), raw and per parameter. Reported as measured:
  no reading of
  "higher is flatter" is built in (docs/methods/slim.md#hessian-trace).
- `layer_shift`: per layer, ||f_l(x_adv) - f_l(x)||_2 / ||f_l(x)||_2 per example (mean, median) and the
  mean cosine between clean and adversarial features (SLIM Fig. 2, docs/methods/sat.md#lambda-search).
- `robust_overfitting`: the suite on the sibling checkpoint (best <-> last) and the best-minus-last gap.

Everything runs in eval mode and restores the model's modes and `requires_grad` flags.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from robust_train.addons.sat_metrics import nearest_centroid
from robust_train.attacks import Attack, attack_mode
from robust_train.data import to_float
from robust_train.errors import ConfigError
from robust_train.models.features import capture_features, known_layer_names, resolve_layer
from robust_train.tracking.results import pipe_table

ANALYSES = ("clustering", "hessian_trace", "layer_shift", "robust_overfitting")
CENTROID_SETS = ("all", "correct")
LAYER_SETS = ("stage", "block")
# Offset of the analysis seed from the run seed: attack starts and Rademacher draws of the analysis
# never share a stream with anything the suite drew.
ANALYSIS_SEED_OFFSET = 7_919

# Defaults of `analysis_options` (mirrors conf/evaluate.yaml, for callers that pass a partial node).
DEFAULTS: dict[str, Any] = {
    "n_examples": 512,
    "batch_size": None,
    "clustering": {
        "inputs": ["clean", "pgd20", "lafeat"],
        "layers": "stage",
        "norm": 2,
        "centroids": "all",
        "train_examples": None,
    },
    "hessian_trace": {
        "inputs": ["clean", "pgd20"],
        "modules": None,
        "samples": 32,
        "batches": 2,
        "batch_size": 64,
    },
    "layer_shift": {"attacks": ["pgd20", "lafeat"], "layers": "block"},
}


# ============================================================================ options
def _opt(options: Mapping[str, Any] | None, *keys: str) -> Any:
    """options[k1][k2]..., falling back to DEFAULTS where the caller's node lacks the key (an explicit
    null is kept: `n_examples: null` means all examples)."""
    node: Any = options
    for key in keys:
        if node is None or not hasattr(node, "get") or key not in node:
            default: Any = DEFAULTS
            for k in keys:
                default = default.get(k) if isinstance(default, Mapping) else None
            return default
        node = node.get(key)
    return node


def _norm_p(value: Any) -> float:
    text = str(value).strip().lower()
    if text in ("inf", "linf", "infinity"):
        return math.inf
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not p >= 1.0:
        raise ConfigError(f"analysis_options.clustering.norm={value!r} is not allowed; choose 1, 2 or inf")
    return p


def _positive_int(value: Any, key: str, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise ConfigError(f"{key}={value!r} must be a positive integer" + (" or null" if optional else ""))
    return int(value)


def _names(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and key == "analysis":
        return [value]  # analysis=clustering: one name without brackets
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ConfigError(f"{key}={value!r} must be a list of names, e.g. [clean, pgd20]")
    return [str(v) for v in value]


def validate_analysis(names: Any, options: Mapping[str, Any] | None = None) -> list[str]:
    """The requested analysis names in order, without duplicates; ConfigError on an unknown name or a
    bad option (checked before the checkpoint is read)."""
    requested = _names(names, "analysis")
    bad = [n for n in requested if n not in ANALYSES]
    if bad:
        raise ConfigError(f"analysis={bad[0]!r} is not a known analysis; allowed: {', '.join(ANALYSES)}")
    _positive_int(_opt(options, "n_examples"), "analysis_options.n_examples", optional=True)
    _positive_int(_opt(options, "batch_size"), "analysis_options.batch_size", optional=True)
    _norm_p(_opt(options, "clustering", "norm"))
    if _opt(options, "clustering", "centroids") not in CENTROID_SETS:
        raise ConfigError(
            f"analysis_options.clustering.centroids={_opt(options, 'clustering', 'centroids')!r} is not "
            f"allowed; choose one of: {', '.join(CENTROID_SETS)}"
        )
    _positive_int(
        _opt(options, "clustering", "train_examples"), "analysis_options.clustering.train_examples", True
    )
    for key in ("samples", "batches", "batch_size"):
        _positive_int(_opt(options, "hessian_trace", key), f"analysis_options.hessian_trace.{key}")
    _names(_opt(options, "clustering", "inputs"), "analysis_options.clustering.inputs")
    _names(_opt(options, "hessian_trace", "inputs"), "analysis_options.hessian_trace.inputs")
    _names(_opt(options, "layer_shift", "attacks"), "analysis_options.layer_shift.attacks")
    for group in ("clustering", "layer_shift"):
        layers = _opt(options, group, "layers")
        if isinstance(layers, str) and layers not in LAYER_SETS:
            raise ConfigError(
                f"analysis_options.{group}.layers={layers!r} is not allowed; choose one of: "
                f"{', '.join(LAYER_SETS)} or a list of layer names"
            )
    return list(dict.fromkeys(requested))


def analysis_layers(model: nn.Module, layers: Any) -> list[str]:
    """'stage' -> the model's stage outputs, 'block' -> its block outputs (stage outputs when it declares
    none), a list -> those submodules (checked, ConfigError naming the known layers)."""
    base = getattr(model, "_orig_mod", model)
    if isinstance(layers, str):
        if layers not in LAYER_SETS:
            raise ConfigError(f"layers={layers!r} is not allowed; choose one of: {', '.join(LAYER_SETS)}")
        names = list(getattr(base, "block_layers" if layers == "block" else "feature_layers", []) or [])
        names = names or list(getattr(base, "feature_layers", []) or []) or known_layer_names(model)
    else:
        names = [str(n) for n in layers]
    for name in names:
        resolve_layer(model, name)
    return names


# ============================================================================ helpers
def _batches(x: torch.Tensor, batch_size: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, float [0,1] batch) over a uint8 or float tensor."""
    for i in range(0, x.shape[0], max(1, batch_size)):
        chunk = x[i : i + batch_size]
        yield i, to_float(chunk) if chunk.dtype == torch.uint8 else chunk


def craft_adversarial(
    model: nn.Module, attack: Attack, x: torch.Tensor, y: torch.Tensor, batch_size: int, desc: str = ""
) -> torch.Tensor:
    """attack(model, x, y) over batches (the whole set at once for attacks that batch internally)."""
    step = x.shape[0] if getattr(attack, "whole_set", False) else batch_size
    out = []
    total = math.ceil(x.shape[0] / max(1, step))
    for i, xb in tqdm(_batches(x, step), total=total, desc=desc, leave=False, disable=not desc, unit="batch"):
        out.append(attack(model, xb, y[i : i + step]).detach())
    return torch.cat(out) if out else x.new_zeros((0, *x.shape[1:]), dtype=torch.float32)


# ============================================================================ clustering
class CentroidAccumulator:
    """Per-class running sums of flattened features, so centroids of a whole training set never need
    all its features in memory at once (a CIFAR ResNet's layer1 is 65,536 values per image)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def add(self, feats: torch.Tensor, y: torch.Tensor) -> None:
        f = feats.flatten(1).double()
        onehot = F.one_hot(y, self.num_classes).double()
        sums, counts = onehot.t() @ f, onehot.sum(0)
        self.sums = sums if self.sums is None else self.sums + sums
        self.counts = counts if self.counts is None else self.counts + counts

    def centroids(self) -> torch.Tensor:
        """(C, d) class means; rows of classes never seen are NaN (they never win the argmin)."""
        if self.sums is None or self.counts is None:
            raise ValueError("no features were added")
        c = self.counts.unsqueeze(1)
        return torch.where(c > 0, self.sums / c.clamp(min=1), torch.full_like(self.sums, float("nan")))


@torch.no_grad()
def layer_centroids(
    model: nn.Module,
    layers: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    batch_size: int = 256,
    correct_only: bool = False,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Class centroids of each layer's flattened output over clean images x (uint8 or float), eval mode.

    `correct_only` keeps only the images the model classifies correctly (SLIM's reading of Jin et al.).
    """
    acc = {name: CentroidAccumulator(num_classes) for name in layers}
    with attack_mode(model, "eval"), capture_features(model, layers, detach=True) as feats:
        total = math.ceil(x.shape[0] / max(1, batch_size))
        # Lazy batches: a whole training set converted to float at once would not fit on many GPUs.
        for i, xb in tqdm(
            _batches(x, batch_size), total=total, desc="centroids", leave=False, disable=not progress
        ):
            yb = y[i : i + batch_size]
            logits = model(xb)
            keep = logits.argmax(1) == yb if correct_only else torch.ones_like(yb, dtype=torch.bool)
            for name in layers:
                acc[name].add(feats[name][keep], yb[keep])
    return {name: a.centroids() for name, a in acc.items()}


@torch.no_grad()
def clustering_accuracy_layers(
    model: nn.Module,
    layers: Sequence[str],
    centroids: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    p: float = 2.0,
    batch_size: int = 256,
) -> dict[str, float]:
    """Clu.Acc (%) per layer of inputs x against the centroids, and the classifier's accuracy (%)."""
    correct = {name: 0 for name in layers}
    classifier = 0
    with attack_mode(model, "eval"), capture_features(model, layers, detach=True) as feats:
        for i, xb in _batches(x, batch_size):
            yb = y[i : i + batch_size]
            classifier += int((model(xb).argmax(1) == yb).sum())
            for name in layers:
                correct[name] += int((nearest_centroid(feats[name], centroids[name], p=p) == yb).sum())
    n = max(1, x.shape[0])
    return {**{name: 100.0 * c / n for name, c in correct.items()}, "classifier": 100.0 * classifier / n}


# ============================================================================ Hessian trace
def hessian_modules(model: nn.Module, names: Sequence[str] | None = None) -> dict[str, list[nn.Parameter]]:
    """Parameters of each module whose Hessian block is estimated. Default: every top-level child that
    owns parameters (conv1, layer1..4, bn, fc for the ResNets), in definition order."""
    base = getattr(model, "_orig_mod", model)
    if names:
        modules = {str(n): resolve_layer(model, str(n)) for n in names}
    else:
        modules = dict(base.named_children())
    out = {name: [p for p in m.parameters() if p.dtype.is_floating_point] for name, m in modules.items()}
    out = {name: ps for name, ps in out.items() if ps}
    if not out:
        raise ConfigError("analysis_options.hessian_trace.modules selects no module with parameters")
    return out


def hutchinson_traces(
    model: nn.Module,
    modules: Mapping[str, Sequence[nn.Parameter]],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    samples: int,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Tr(H_m) of the batch-mean CE loss w.r.t. each module's parameters, estimated with Hutchinson's
    identity E_v[v^T H_m v] = Tr(H_m) for Rademacher v, averaged over `samples` draws and the batches.

    Each module gets its own draws and Hessian-vector products (double backward), so the estimate is
    of the diagonal block H_m, not of v^T H v over the whole network. Per module: `trace`, `avg_trace`
    (= trace / #params), `n_params` and the standard error of the trace estimate.
    """
    if samples < 1 or not batches:
        raise ValueError("hutchinson_traces needs samples >= 1 and at least one batch")
    params_all = list(dict.fromkeys(p for ps in modules.values() for p in ps))
    device = params_all[0].device
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    draws: dict[str, list[float]] = {name: [] for name in modules}
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params_all:
            p.requires_grad_(True)
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            grads = torch.autograd.grad(loss, params_all, create_graph=True, allow_unused=True)
            grad_of = dict(zip(params_all, grads, strict=True))
            for name, params in modules.items():
                # Parameters the loss does not reach, or reaches linearly, have a zero Hessian block.
                pairs = [
                    (p, grad_of[p]) for p in params if grad_of[p] is not None and grad_of[p].requires_grad
                ]
                for _ in range(samples):
                    if not pairs:
                        draws[name].append(0.0)
                        continue
                    vs = [
                        torch.randint(0, 2, p.shape, generator=gen, device=device).to(p.dtype).mul_(2).sub_(1)
                        for p, _ in pairs
                    ]
                    hvs = torch.autograd.grad(
                        [g for _, g in pairs], [p for p, _ in pairs], grad_outputs=vs,
                        retain_graph=True, allow_unused=True,
                    )  # fmt: skip
                    est = sum(float((v * h).sum()) for v, h in zip(vs, hvs, strict=True) if h is not None)
                    draws[name].append(est)
            del loss, grads, grad_of
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, flag in flags:
            p.requires_grad_(flag)
    out: dict[str, dict[str, float]] = {}
    for name, params in modules.items():
        values = torch.tensor(draws[name], dtype=torch.float64)
        n_params = sum(p.numel() for p in params)
        trace = float(values.mean())
        err = float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else float("nan")
        out[name] = {"trace": trace, "avg_trace": trace / n_params, "n_params": n_params, "std_err": err}
    return out


# ============================================================================ layer shift
@torch.no_grad()
def layer_shift(
    model: nn.Module,
    layers: Sequence[str],
    x: torch.Tensor,
    x_adv: torch.Tensor,
    batch_size: int = 256,
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """Per layer l and example i, r_i = ||f_l(x_adv_i) - f_l(x_i)||_2 / ||f_l(x_i)||_2 and the cosine of the
    two flattened features. Returns ({layer: mean/median/std of r, mean cosine}, {layer: r per example})."""
    rel: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    cos: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    with attack_mode(model, "eval"), capture_features(model, layers, detach=True) as feats:
        for i, xb in _batches(x, batch_size):
            model(xb)
            clean = {n: feats[n].flatten(1).double() for n in layers}
            xa = x_adv[i : i + batch_size]
            model(to_float(xa) if xa.dtype == torch.uint8 else xa)
            for n in layers:
                adv = feats[n].flatten(1).double()
                rel[n].append((adv - clean[n]).norm(dim=1) / clean[n].norm(dim=1).clamp_min(1e-12))
                cos[n].append(F.cosine_similarity(adv, clean[n], dim=1, eps=1e-12))
    per_example = {n: torch.cat(rel[n]).cpu() for n in layers}
    summary = {}
    for n in layers:
        r, c = per_example[n], torch.cat(cos[n]).cpu()
        summary[n] = {
            "rel_shift_mean": float(r.mean()),
            "rel_shift_median": float(r.median()),
            "rel_shift_std": float(r.std(unbiased=False)),
            "cosine_mean": float(c.mean()),
        }
    return summary, per_example


# ============================================================================ robust overfitting
def suite_gap(evaluation: Mapping[str, Any]) -> dict[str, float] | None:
    """Best minus last accuracy (points) for every attack both checkpoints were evaluated with; None
    unless both exist. A positive gap is robust overfitting: the final model lost what the best had."""
    best, last = evaluation.get("best"), evaluation.get("last")
    if not isinstance(best, Mapping) or not isinstance(last, Mapping):
        return None
    # An entry that duplicates the other checkpoint (same epoch) has a zero gap.
    b = best.get("attacks") or (last.get("attacks") if best.get("same_as") == "last" else None) or {}
    a = last.get("attacks") or (best.get("attacks") if last.get("same_as") == "best" else None) or {}
    return {name: float(b[name]["accuracy"]) - float(a[name]["accuracy"]) for name in b if name in a}


def format_gap(gap: Mapping[str, float] | None) -> str:
    """One console line; empty when there is no gap to show."""
    if not gap:
        return ""
    return "robust overfitting (best - last, points): " + ", ".join(f"{k} {v:+.2f}" for k, v in gap.items())


def sibling_checkpoint(checkpoint: str | Path) -> tuple[str, Path] | None:
    """('last', .../last.pt) for a best.pt and vice versa, when that file exists."""
    path = Path(str(checkpoint))
    other = {"best": "last", "last": "best"}.get(path.stem)
    if other is None or not (path.parent / f"{other}.pt").is_file():
        return None
    return other, path.parent / f"{other}.pt"


def evaluate_sibling(
    model: nn.Module,
    wrap: Callable[[nn.Module], nn.Module],
    attacks: Mapping[str, Attack],
    checkpoint: str | Path,
    own_epoch: int,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    state_dir: Path | None = None,
    progress: bool = True,
) -> tuple[str, dict[str, Any]] | None:
    """The suite on the sibling of `checkpoint` (best <-> last) for the robust-overfitting gap.

    Loads the sibling's weights into `model` (the plain network; `wrap` applies the add-ons' eval-time
    wrappers) and returns (kind, entry shaped like results['eval'][kind]), or None when there is no
    sibling. A sibling saved at the same epoch holds the same weights and is not evaluated again.
    """
    from robust_train.evaluation.suite import run_suite
    from robust_train.models import check_state_dict_compatible
    from robust_train.tracking.checkpoint import load_checkpoint

    found = sibling_checkpoint(checkpoint)
    if found is None:
        return None
    kind, path = found
    state = load_checkpoint(path, map_location=x.device)
    epoch = int(state.get("epoch", -1))
    entry: dict[str, Any] = {"epoch": epoch, "checkpoint": str(path)}
    if epoch == own_epoch:
        return kind, {**entry, "same_as": Path(str(checkpoint)).stem}
    check_state_dict_compatible(model, state["model"], str(path))
    model.load_state_dict(state["model"])
    entry["attacks"] = run_suite(wrap(model), attacks, x, y, batch_size, progress, kind, state_dir=state_dir)
    return kind, entry


# ============================================================================ the runner
def run_analysis(
    model: nn.Module,
    names: Sequence[str],
    options: Mapping[str, Any] | None,
    attacks: Mapping[str, Attack],
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    out_dir: Path,
    label: str = "",
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the named analyses (robust_overfitting excepted: it needs the suite, see `sibling_checkpoint`)
    on the first `n_examples` test images; plots go to out_dir/analysis_<name>[_<label>].png.

    `attacks` are the suite's attacks by name; inputs named in the options but absent from the suite
    are skipped and listed under `skipped`. `model` is the plain network (no eval-time wrappers: the
    hooks need its layers).
    """
    from robust_train.evaluation import plots

    names = validate_analysis(names, options)
    n = _opt(options, "n_examples")
    bs = int(_opt(options, "batch_size") or batch_size)
    x, y = test if n is None else (test[0][: int(n)], test[1][: int(n)])
    out_dir = Path(out_dir)
    suffix = f"_{label}" if label else ""
    result: dict[str, Any] = {
        "checkpoint": label,
        "n_examples": int(x.shape[0]),
        "batch_size": bs,
        "plots": {},
    }
    if not {"clustering", "hessian_trace", "layer_shift"} & set(names):
        return result
    torch.manual_seed(int(seed) + ANALYSIS_SEED_OFFSET)

    wanted: list[str] = []
    if "clustering" in names:
        wanted += _names(_opt(options, "clustering", "inputs"), "clustering.inputs")
    if "hessian_trace" in names:
        wanted += _names(_opt(options, "hessian_trace", "inputs"), "hessian_trace.inputs")
    if "layer_shift" in names:
        wanted += _names(_opt(options, "layer_shift", "attacks"), "layer_shift.attacks")
    inputs: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name in dict.fromkeys(wanted):
        if name == "clean":
            inputs[name] = to_float(x) if x.dtype == torch.uint8 else x
        elif name in attacks:
            inputs[name] = craft_adversarial(
                model, attacks[name], x, y, bs, f"analysis {name}" if progress else ""
            )
        else:
            skipped.append(name)
    result["inputs"] = list(inputs)
    result["skipped"] = skipped

    if "clustering" in names:
        layers = analysis_layers(model, _opt(options, "clustering", "layers"))
        p = _norm_p(_opt(options, "clustering", "norm"))
        which = _opt(options, "clustering", "centroids")
        limit = _opt(options, "clustering", "train_examples")
        tx, ty = train if limit is None else (train[0][: int(limit)], train[1][: int(limit)])
        cents = layer_centroids(model, layers, tx, ty, num_classes, bs, which == "correct", progress)
        per_input = {
            name: clustering_accuracy_layers(model, layers, cents, inputs[name], y, p, bs)
            for name in _names(_opt(options, "clustering", "inputs"), "clustering.inputs")
            if name in inputs
        }
        result["clustering"] = {
            "layers": layers,
            "norm": "inf" if math.isinf(p) else (int(p) if p == int(p) else p),
            "centroids": which,
            "train_examples": int(tx.shape[0]),
            "accuracy": per_input,
        }
        result["plots"]["clustering"] = str(
            plots.plot_layer_series(
                out_dir / f"analysis_clustering{suffix}.png", layers,
                {k: [v[layer] for layer in layers] for k, v in per_input.items()},
                f"clustering-effect accuracy ({label or 'model'})", "Clu.Acc (%)", (0, 100),
            )
        )  # fmt: skip

    if "hessian_trace" in names:
        modules = hessian_modules(model, _opt(options, "hessian_trace", "modules"))
        hb = int(_opt(options, "hessian_trace", "batch_size"))
        n_batches = int(_opt(options, "hessian_trace", "batches"))
        samples = int(_opt(options, "hessian_trace", "samples"))
        traces: dict[str, Any] = {}
        for name in _names(_opt(options, "hessian_trace", "inputs"), "hessian_trace.inputs"):
            if name not in inputs:
                continue
            xs = inputs[name]
            batches = [
                (xs[i : i + hb], y[i : i + hb]) for i in range(0, min(xs.shape[0], hb * n_batches), hb)
            ]
            per_module = hutchinson_traces(
                model, modules, batches, samples, seed=int(seed) + ANALYSIS_SEED_OFFSET
            )
            total_params = sum(v["n_params"] for v in per_module.values())
            total = sum(v["trace"] for v in per_module.values())
            traces[name] = {
                "modules": per_module,
                "sum": {"trace": total, "avg_trace": total / max(1, total_params), "n_params": total_params},
                "n_examples": sum(int(b[0].shape[0]) for b in batches),
            }
        result["hessian_trace"] = {
            "samples": samples,
            "batch_size": hb,
            "batches": n_batches,
            "inputs": traces,
        }
        result["plots"]["hessian_trace"] = str(
            plots.plot_module_bars(
                out_dir / f"analysis_hessian_trace{suffix}.png", list(modules),
                {k: [v["modules"][m]["avg_trace"] for m in modules] for k, v in traces.items()},
                f"average module-wise Hessian trace ({label or 'model'})", "Tr(H_m) / #params",
            )
        )  # fmt: skip

    if "layer_shift" in names:
        layers = analysis_layers(model, _opt(options, "layer_shift", "layers"))
        shifts: dict[str, Any] = {}
        last_samples = {}
        for name in _names(_opt(options, "layer_shift", "attacks"), "layer_shift.attacks"):
            if name not in inputs or name == "clean":
                continue
            summary, per_example = layer_shift(model, layers, inputs["clean"] if "clean" in inputs else x,
                                               inputs[name], bs)  # fmt: skip
            shifts[name] = summary
            last_samples[name] = per_example[layers[-1]].numpy()
        result["layer_shift"] = {"layers": layers, "attacks": shifts}
        result["plots"]["layer_shift"] = str(
            plots.plot_layer_shift(
                out_dir / f"analysis_layer_shift{suffix}.png", layers,
                {k: [v[layer]["rel_shift_mean"] for layer in layers] for k, v in shifts.items()},
                last_samples, f"relative feature shift per layer ({label or 'model'})",
            )
        )  # fmt: skip
    return result


# ============================================================================ reporting
def analysis_rows(analysis: Mapping[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
    """W&B tables (columns, rows) of each analysis present."""
    tables: dict[str, tuple[list[str], list[list[Any]]]] = {}
    if "clustering" in analysis:
        c = analysis["clustering"]
        tables["clustering"] = (
            ["input", "layer", "clu_acc"],
            [
                [i, layer, acc[layer]]
                for i, acc in c["accuracy"].items()
                for layer in [*c["layers"], "classifier"]
            ],
        )
    if "hessian_trace" in analysis:
        tables["hessian_trace"] = (
            ["input", "module", "trace", "avg_trace", "n_params", "std_err"],
            [
                [i, m, v["trace"], v["avg_trace"], v["n_params"], v["std_err"]]
                for i, entry in analysis["hessian_trace"]["inputs"].items()
                for m, v in entry["modules"].items()
            ],
        )
    if "layer_shift" in analysis:
        tables["layer_shift"] = (
            ["attack", "layer", "rel_shift_mean", "rel_shift_median", "cosine_mean"],
            [
                [a, layer, v["rel_shift_mean"], v["rel_shift_median"], v["cosine_mean"]]
                for a, per_layer in analysis["layer_shift"]["attacks"].items()
                for layer, v in per_layer.items()
            ],
        )
    return tables


def analysis_summary(analysis: Mapping[str, Any], prefix: str = "analysis") -> dict[str, float]:
    """Flat scalars for the W&B run summary, e.g. analysis/clustering/pgd20/layer4."""
    out: dict[str, float] = {}
    for i, acc in (analysis.get("clustering") or {}).get("accuracy", {}).items():
        out.update({f"{prefix}/clustering/{i}/{k}": v for k, v in acc.items()})
    for i, entry in (analysis.get("hessian_trace") or {}).get("inputs", {}).items():
        out.update(
            {f"{prefix}/hessian_avg_trace/{i}/{m}": v["avg_trace"] for m, v in entry["modules"].items()}
        )
    for a, per_layer in (analysis.get("layer_shift") or {}).get("attacks", {}).items():
        out.update({f"{prefix}/layer_shift/{a}/{k}": v["rel_shift_mean"] for k, v in per_layer.items()})
    return out


def format_analysis(analysis: Mapping[str, Any]) -> str:
    """Console tables of the analysis results (layers as columns)."""
    lines: list[str] = []

    def table(title: str, cols: list[str], rows: list[list[str]]) -> None:
        lines.append(title)
        lines.extend(pipe_table(cols, rows))

    c = analysis.get("clustering")
    if c and c["accuracy"]:
        cols = [*c["layers"], "classifier"]
        table(
            f"clustering-effect accuracy (%), {analysis.get('n_examples')} test images, "
            f"L{c['norm']} nearest centroid of {c['centroids']} training images",
            ["input", *cols],
            [[i, *(f"{acc[k]:.2f}" for k in cols)] for i, acc in c["accuracy"].items()],
        )
    h = analysis.get("hessian_trace")
    if h and h["inputs"]:
        mods = list(next(iter(h["inputs"].values()))["modules"])
        table(
            f"average Hessian trace Tr(H_m)/#params ({h['samples']} Rademacher draws x "
            f"{h['batches']} batches)",
            ["input", *mods],
            [[i, *(f"{e['modules'][m]['avg_trace']:.3e}" for m in mods)] for i, e in h["inputs"].items()],
        )
    s = analysis.get("layer_shift")
    if s and s["attacks"]:
        table(
            "relative feature shift ||f(x_adv) - f(x)|| / ||f(x)|| (mean over examples)",
            ["attack", *s["layers"]],
            [[a, *(f"{v[k]['rel_shift_mean']:.3f}" for k in s["layers"])] for a, v in s["attacks"].items()],
        )
    if analysis.get("skipped"):
        lines.append(f"analysis inputs not in the suite (skipped): {', '.join(analysis['skipped'])}")
    if analysis.get("plots"):
        lines.append("plots: " + ", ".join(str(p) for p in analysis["plots"].values()))
    return "\n".join(lines)


def log_analysis(tracker: Any, analysis: Mapping[str, Any]) -> None:
    """Tables, summary scalars and plot images through the run's tracker."""
    for name, (cols, rows) in analysis_rows(analysis).items():
        tracker.log_table(f"analysis/{name}", cols, rows)
    tracker.summary(analysis_summary(analysis))
    images = {f"analysis/{k}": Path(v) for k, v in (analysis.get("plots") or {}).items()}
    if images and hasattr(tracker, "log_images"):
        tracker.log_images(images)
