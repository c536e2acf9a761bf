"""Layer-wise analysis (issue 5 items 4-5): Hutchinson trace vs the exact Hessian, clustering accuracy vs
direct computations, layer shift vs a hand computation, plots, the runner, and robust-eval end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_train.addons.sat_metrics import class_centroids
from robust_train.attacks import PGD, ThreatModel
from robust_train.errors import ConfigError
from robust_train.evaluation import plots
from robust_train.evaluation.analysis import (
    ANALYSES,
    CentroidAccumulator,
    clustering_accuracy_layers,
    format_analysis,
    hessian_modules,
    hutchinson_traces,
    layer_centroids,
    layer_shift,
    run_analysis,
    sibling_checkpoint,
    suite_gap,
    validate_analysis,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PointModel(nn.Module):
    """Features are the input itself (layer `feat`), so centroids and distances are known by hand."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x))


class SmallNet(nn.Module):
    """lin1 -> bn -> tanh -> fc: every module has a non-zero Hessian block under CE, and few enough
    parameters (63) for exact Hessians and hundreds of Hessian-vector products in a second or two."""

    def __init__(self, d_in: int = 6, hidden: int = 5, num_classes: int = 3) -> None:
        super().__init__()
        self.lin1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.bn(self.lin1(x.flatten(1)))))


def _is_png(path: Path) -> bool:
    data = Path(path).read_bytes()
    return data[:8] == PNG_MAGIC and matplotlib.image.imread(str(path)).ndim == 3


# ----------------------------------------------------------------------------- Hessian trace
def _exact_block_trace(
    model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor
) -> float:
    """Trace of the exact Hessian of mean CE w.r.t. `params`, built with torch.autograd.functional.hessian."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat0 = torch.cat([p.detach().flatten() for p in params])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(flat, sizes)
        override = {k: t.view(s) for k, t, s in zip(keys, pieces, shapes, strict=True)}
        logits = torch.func.functional_call(model, override, (x,))
        return F.cross_entropy(logits, y)

    hess = torch.autograd.functional.hessian(loss_of, flat0)
    return float(torch.diagonal(hess).sum())


def test_hutchinson_matches_exact_hessian_trace() -> None:
    torch.manual_seed(0)
    model = SmallNet().double().eval()
    with torch.no_grad():  # non-trivial BN statistics so the eval-mode BN is not the identity
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.rand(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g))
               for _ in range(2)]  # fmt: skip
    modules = hessian_modules(model)
    assert list(modules) == ["lin1", "bn", "fc"]
    samples = 400
    est = hutchinson_traces(model, modules, batches, samples=samples, seed=1)
    for name, params in modules.items():
        # Tr of the Hessian of the mean over batches = mean of the per-batch traces (equal batch sizes).
        exact = float(np.mean([_exact_block_trace(model, params, x, y) for x, y in batches]))
        got = est[name]
        assert got["n_params"] == sum(p.numel() for p in params)
        assert got["avg_trace"] == pytest.approx(got["trace"] / got["n_params"])
        # Tolerance: Hutchinson is unbiased with Var(v^T H v) = 2 * sum_{i != j} H_ij^2, so the mean of
        # 2 x 400 draws is within 4 standard errors of the truth except with probability ~1e-4 (and
        # the seed is fixed). The second bound keeps the check meaningful: the error bar must be small.
        assert abs(got["trace"] - exact) <= 4 * got["std_err"] + 1e-9, (name, got, exact)
        assert got["std_err"] <= 0.1 * abs(exact) + 1e-9, (name, got, exact)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_restores_the_model() -> None:
    # A per-parameter loss separable in the weights: v^T H v = sum_i H_ii v_i^2 = Tr(H) for every draw.
    model = nn.Sequential(nn.Linear(3, 1, bias=False)).double().train()
    x = torch.eye(3, dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    model[0].weight.requires_grad_(False)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = model[0]

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            z = self.lin(inp)  # (3, 1): example i sees weight i only
            return torch.cat([z, torch.zeros_like(z)], dim=1)

    net = Wrap().train()
    est = hutchinson_traces(net, hessian_modules(net), [(x, y)], samples=3, seed=0)
    exact = _exact_block_trace(net, list(net.lin.parameters()), x, y)
    assert est["lin"]["trace"] == pytest.approx(exact, rel=1e-10)
    assert est["lin"]["std_err"] == pytest.approx(0.0, abs=1e-12)
    assert net.training and not model[0].weight.requires_grad  # modes and flags restored


def test_hessian_modules_named_and_unknown() -> None:
    model = SmallNet()
    assert list(hessian_modules(model, ["fc"])) == ["fc"]
    with pytest.raises(ConfigError, match="nope"):
        hessian_modules(model, ["nope"])


# ----------------------------------------------------------------------------- clustering
def test_clustering_accuracy_hand_built_features() -> None:
    # Class 0 training points average to (1, 0), class 1 to (10, 11).
    train_x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 12.0]])
    train_y = torch.tensor([0, 0, 1, 1])
    model = PointModel(torch.eye(2))
    cents = layer_centroids(model, ["feat"], train_x, train_y, num_classes=2, batch_size=3)
    assert torch.allclose(cents["feat"], torch.tensor([[1.0, 0.0], [10.0, 11.0]], dtype=torch.float64))
    # Three test points near their own centroid; the fourth (label 0) sits on class 1's centroid.
    test_x = torch.tensor([[1.5, 0.5], [9.0, 11.0], [0.0, 1.0], [10.0, 11.0]])
    test_y = torch.tensor([0, 1, 0, 0])
    acc = clustering_accuracy_layers(model, ["feat"], cents, test_x, test_y, p=2.0, batch_size=2)
    assert acc["feat"] == pytest.approx(75.0)
    # Every point placed on the centroid of class (c + 1) mod C: accuracy 0 (argmin, labels aligned).
    shifted = clustering_accuracy_layers(model, ["feat"], cents, cents["feat"].flip(0).float(),
                                         torch.tensor([0, 1]), p=2.0)  # fmt: skip
    assert shifted["feat"] == 0.0


def _brute_force(train_f, train_y, keep, test_f, test_y, num_classes, p) -> float:
    cents = []
    for c in range(num_classes):
        rows = [train_f[i] for i in range(len(train_y)) if train_y[i] == c and keep[i]]
        cents.append(None if not rows else [sum(col) / len(rows) for col in zip(*rows, strict=True)])
    hits = 0
    for f, label in zip(test_f, test_y, strict=True):
        best, best_c = math.inf, -1
        for c, mu in enumerate(cents):
            if mu is None:
                continue
            diff = [abs(a - b) for a, b in zip(f, mu, strict=True)]
            d = max(diff) if math.isinf(p) else sum(t**p for t in diff) ** (1 / p)
            if d < best:
                best, best_c = d, c
        hits += int(best_c == label)
    return 100.0 * hits / len(test_y)


@pytest.mark.parametrize("p", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("correct_only", [False, True])
def test_clustering_accuracy_equals_brute_force(p: float, correct_only: bool) -> None:
    g = torch.Generator().manual_seed(5)
    num_classes, d = 3, 4
    weight = torch.randn(num_classes, d, generator=g)
    model = PointModel(weight)
    means = 2 * torch.randn(num_classes, d, generator=g)
    train_y = torch.randint(0, num_classes, (40,), generator=g)
    train_x = means[train_y] + torch.randn(40, d, generator=g)
    test_y = torch.randint(0, num_classes, (25,), generator=g)
    test_x = means[test_y] + 1.5 * torch.randn(25, d, generator=g)
    keep = (model(train_x).argmax(1) == train_y) if correct_only else torch.ones(40, dtype=torch.bool)
    assert 0 < int(keep.sum()) < 40 or not correct_only  # the filter matters in this draw
    cents = layer_centroids(
        model, ["feat"], train_x, train_y, num_classes, batch_size=7, correct_only=correct_only
    )
    got = clustering_accuracy_layers(model, ["feat"], cents, test_x, test_y, p=p, batch_size=6)
    want = _brute_force(train_x.tolist(), train_y.tolist(), keep.tolist(), test_x.tolist(), test_y.tolist(),
                        num_classes, p)  # fmt: skip
    assert got["feat"] == pytest.approx(want)
    assert got["classifier"] == pytest.approx(
        100.0 * float((model(test_x).argmax(1) == test_y).float().mean())
    )


def test_streamed_centroids_equal_one_shot_and_absent_class_never_wins() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(30, 2, 3, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)  # class 3 of 4 is absent
    acc = CentroidAccumulator(4)
    for i in range(0, 30, 8):
        acc.add(f[i : i + 8], y[i : i + 8])
    streamed = acc.centroids()
    one_shot = class_centroids(f, y, 4)
    assert torch.allclose(streamed[:3], one_shot[:3]) and torch.isnan(streamed[3]).all()


# ----------------------------------------------------------------------------- layer shift
def test_layer_shift_equals_direct_computation(tiny_model: nn.Module) -> None:
    model = tiny_model.double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64)
    x_adv = (x + 0.05 * torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)).clamp(0, 1)
    summary, per_example = layer_shift(model, ["conv", "bn"], x, x_adv, batch_size=4)
    with torch.no_grad():
        for name, fn in (("conv", model.conv), ("bn", lambda t: model.bn(model.conv(t)))):
            a, b = fn(x).flatten(1), fn(x_adv).flatten(1)
            rel = (b - a).norm(dim=1) / a.norm(dim=1)
            assert torch.allclose(per_example[name], rel)
            assert summary[name]["rel_shift_mean"] == pytest.approx(float(rel.mean()))
            assert summary[name]["rel_shift_median"] == pytest.approx(float(rel.median()))
            assert summary[name]["cosine_mean"] == pytest.approx(float(F.cosine_similarity(a, b).mean()))
    same, _ = layer_shift(model, ["conv"], x, x, batch_size=4)
    assert same["conv"]["rel_shift_mean"] == 0.0


# ----------------------------------------------------------------------------- plots
def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    layers = ["layer1", "layer2", "layer3"]
    paths = [
        plots.plot_layer_series(
            tmp_path / "a.png", layers, {"clean": [10, 20, 30], "pgd": [5, 6, 7]}, "t", "y"
        ),
        plots.plot_layer_shift(
            tmp_path / "b.png", layers, {"pgd": [0.1, 0.2, 0.4]}, {"pgd": np.array([0.3, 0.4, 0.5])}, "t"
        ),  # fmt: skip
        plots.plot_module_bars(tmp_path / "c.png", ["conv1", "fc"], {"clean": [1e-3, -2e-5]}, "t", "y"),
        plots.plot_instance_tracking(
            tmp_path / "d.png",
            [1, 2],
            {"av_sd": [0.1, 0.2], "robust_acc": [40, 50]},
            np.array([[1, 0, 1], [1, 1, 0]], dtype=bool),
        ),  # fmt: skip
    ]
    assert all(_is_png(p) for p in paths)


# ----------------------------------------------------------------------------- the runner
def test_validate_analysis_names_and_options() -> None:
    assert validate_analysis(["layer_shift", "clustering", "layer_shift"]) == ["layer_shift", "clustering"]
    assert validate_analysis(None) == []
    with pytest.raises(ConfigError) as err:
        validate_analysis(["clustering", "tsne"])
    assert "tsne" in str(err.value) and all(n in str(err.value) for n in ANALYSES)
    with pytest.raises(ConfigError, match="analysis_options.clustering.norm"):
        validate_analysis(["clustering"], {"clustering": {"norm": 0.5}})
    with pytest.raises(ConfigError, match="analysis_options.clustering.centroids"):
        validate_analysis(["clustering"], {"clustering": {"centroids": "some"}})
    with pytest.raises(ConfigError, match="analysis_options.hessian_trace.samples"):
        validate_analysis(["hessian_trace"], {"hessian_trace": {"samples": 0}})
    with pytest.raises(ConfigError, match="analysis_options.layer_shift.layers"):
        validate_analysis(["layer_shift"], {"layer_shift": {"layers": "every"}})


def test_run_analysis_on_tiny_model(tiny_model: nn.Module, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    train = (
        torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (40,), generator=g),
    )
    test = (
        torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (20,), generator=g),
    )
    pgd = PGD(ThreatModel("linf", 8 / 255), steps=3, step_size=2 / 255)
    options = {"n_examples": 16, "clustering": {"layers": ["conv", "bn"]},
               "hessian_trace": {"samples": 2, "batches": 2, "batch_size": 8},
               "layer_shift": {"layers": ["conv", "bn"]}}  # fmt: skip
    tiny_model.train()
    flags = [p.requires_grad for p in tiny_model.parameters()]
    res = run_analysis(tiny_model, ["clustering", "hessian_trace", "layer_shift"], options, {"pgd20": pgd},
                       train, test, 10, tmp_path, label="best", batch_size=8, seed=0)  # fmt: skip
    assert tiny_model.training and [p.requires_grad for p in tiny_model.parameters()] == flags
    assert res["n_examples"] == 16 and res["skipped"] == ["lafeat"]
    assert set(res["clustering"]["accuracy"]) == {"clean", "pgd20"}
    for acc in res["clustering"]["accuracy"].values():
        assert set(acc) == {"conv", "bn", "classifier"} and all(0 <= v <= 100 for v in acc.values())
    assert res["clustering"]["train_examples"] == 40
    h = res["hessian_trace"]["inputs"]
    assert set(h) == {"clean", "pgd20"} and h["clean"]["n_examples"] == 16
    assert set(h["clean"]["modules"]) == {"conv", "bn", "fc"}
    assert all(math.isfinite(v["trace"]) for v in h["pgd20"]["modules"].values())
    shift = res["layer_shift"]["attacks"]["pgd20"]
    assert set(shift) == {"conv", "bn"} and shift["conv"]["rel_shift_mean"] > 0
    for name in ("clustering", "hessian_trace", "layer_shift"):
        path = Path(res["plots"][name])
        assert path.name == f"analysis_{name}_best.png" and _is_png(path)
    json.dumps(res)  # results.json-ready
    text = format_analysis(res)
    assert "clustering-effect accuracy" in text and "pgd20" in text and "lafeat" in text


def test_run_analysis_is_deterministic_under_a_seed(tiny_model: nn.Module, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    data = (
        torch.randint(0, 256, (12, 3, 8, 8), generator=g, dtype=torch.uint8),
        torch.randint(0, 10, (12,), generator=g),
    )
    pgd = PGD(ThreatModel("linf", 8 / 255), steps=2, step_size=2 / 255)  # uniform random start
    opts = {
        "n_examples": None,  # explicit null: every test image, not the default 512
        "hessian_trace": {"samples": 2, "batches": 1, "batch_size": 6},
        "layer_shift": {"layers": ["bn"]},
    }
    runs = [run_analysis(tiny_model, ["hessian_trace", "layer_shift"], opts, {"pgd20": pgd}, data, data, 10,
                         tmp_path, seed=3) for _ in range(2)]  # fmt: skip
    for r in runs:
        r.pop("plots")
    assert runs[0] == runs[1] and runs[0]["n_examples"] == 12


def test_suite_gap_and_sibling(tmp_path: Path) -> None:
    ev = {"best": {"attacks": {"clean": {"accuracy": 80.0}, "pgd20": {"accuracy": 45.0}}},
          "last": {"attacks": {"clean": {"accuracy": 84.0}, "pgd20": {"accuracy": 40.0}}}}  # fmt: skip
    assert suite_gap(ev) == {"clean": -4.0, "pgd20": 5.0}
    assert suite_gap({"best": ev["best"]}) is None
    assert suite_gap({"best": ev["best"], "last": {"same_as": "best"}}) == {"clean": 0.0, "pgd20": 0.0}
    (tmp_path / "best.pt").write_bytes(b"")
    assert sibling_checkpoint(tmp_path / "best.pt") is None
    (tmp_path / "last.pt").write_bytes(b"")
    assert sibling_checkpoint(tmp_path / "best.pt") == ("last", tmp_path / "last.pt")
    assert sibling_checkpoint(tmp_path / "other.pt") is None


# ----------------------------------------------------------------------------- robust-eval end to end
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from robust_train.commands.train import train_run
    from robust_train.tracking.checkpoint import load_checkpoint, save_checkpoint

    conf = Path(__file__).resolve().parents[2] / "robust_train" / "conf"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        overrides = [
            "debug=fast",
            "logger=none",
            "trainer.progress=false",
            "eval=quick",
            "eval.n_examples=16",
        ]
        overrides += ["eval.sanity.enabled=false", "dataset.train_limit=128"]
        cfg = compose("config", overrides=overrides)
    run_dir = tmp_path_factory.mktemp("analysis") / "run"
    train_run(cfg, run_dir)
    # A best.pt from another epoch with other weights, so robust_overfitting evaluates a real sibling.
    state = load_checkpoint(run_dir / "last.pt")
    state["epoch"] = 0
    state["model"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(state, run_dir / "best.pt")
    return run_dir


def test_robust_eval_with_analysis(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from robust_train.commands.evaluate import evaluate_checkpoint

    conf = Path(__file__).resolve().parents[2] / "robust_train" / "conf"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            f"checkpoint={tiny_checkpoint / 'last.pt'}", "eval=quick", "eval.n_examples=16", "logger=none",
            "eval.sanity.enabled=false",
            "analysis=[clustering,hessian_trace,layer_shift,robust_overfitting]",
            "analysis_options.clustering.train_examples=64", "analysis_options.hessian_trace.samples=2",
            "analysis_options.hessian_trace.batches=1", "analysis_options.hessian_trace.batch_size=8",
        ])  # fmt: skip
    out = tmp_path / "eval"
    evaluate_checkpoint(cfg, out)
    res = json.loads((out / "results.json").read_text())
    a = res["analysis"]
    assert a["checkpoint"] == "last" and a["n_examples"] == 16
    assert set(a["clustering"]["accuracy"]) == {"clean", "pgd20"}
    assert a["clustering"]["layers"] == ["layer1", "layer2", "layer3", "layer4"]
    assert set(a["hessian_trace"]["inputs"]["clean"]["modules"]) >= {"conv1", "layer1", "fc"}
    assert len(a["layer_shift"]["layers"]) == 8  # block outputs of PreActResNet-18
    for name in ("clustering", "hessian_trace", "layer_shift"):
        assert (out / f"analysis_{name}_last.png").is_file()
    best, last = res["eval"]["best"], res["eval"]["last"]
    assert best["epoch"] == 0 and set(best["attacks"]) == {"clean", "pgd20"}
    gap = res["eval"]["gap"]
    assert gap["pgd20"] == pytest.approx(
        best["attacks"]["pgd20"]["accuracy"] - last["attacks"]["pgd20"]["accuracy"]
    )
    printed = capsys.readouterr().out
    assert "clustering-effect accuracy" in printed and "analysis_layer_shift_last.png" in printed


def test_robust_eval_unknown_analysis_is_a_user_error(tmp_path: Path) -> None:
    # Refused before the checkpoint is read: the path need not exist.
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "robust-eval"), f"checkpoint={tmp_path / 'missing.pt'}",
         "logger=none", "analysis=[clustering,tsne]", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "analysis='tsne'" in proc.stderr and "hessian_trace" in proc.stderr
    assert "Traceback" not in proc.stderr
