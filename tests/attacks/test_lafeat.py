"""LAFEAT (docs/methods/lafeat.md, docs/methods/lafeat.md#tests): heads, cache, attack loop, orchestration,
configs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from feature_attack_helpers import SmallNet, trained_small_net
from torch import nn

from robust_train.attacks import LAFEAT, PGD, ThreatModel, build_attack
from robust_train.attacks.lafeat import beta_order, default_layers, mixed_logits
from robust_train.attacks.lafeat_heads import (
    HeadCache,
    HeadSettings,
    LatentHead,
    LatentHeads,
    model_fingerprint,
)
from robust_train.data import to_float
from robust_train.errors import ConfigError
from robust_train.models import build_model, forward_with_features

EPS = 0.1  # the mnist5k threat model
EPS_RUN = EPS - 1.9e-8  # the official float-safety shrink


@pytest.fixture(scope="module")
def trained() -> dict:
    return trained_small_net()


# The attack's keyword arguments named as the config keys they come from (`head_*` are the heads').
_HEAD_SETTINGS = {"head_epochs": "epochs", "head_samples": "samples", "head_batch_size": "batch_size",
                  "head_lr": "lr", "head_channels": "channels", "head_hidden": "hidden",
                  "head_augment": "augment", "head_data": "data", "head_dataset": "dataset",
                  "head_seed": "data_seed"}  # fmt: skip


def _attack(cache_dir=None, **kw) -> LAFEAT:
    """LAFEAT with a HeadCache: `head_*` keywords configure the heads, the others the attack."""
    heads = {_HEAD_SETTINGS[k]: kw.pop(k) for k in list(kw) if k in _HEAD_SETTINGS}
    source = HeadCache(HeadSettings(**heads, seed=kw.get("seed", 0)), cache_dir)
    return LAFEAT(ThreatModel("linf", EPS), source, **kw)


def _lafeat(trained: dict, tmp_path, **kw) -> LAFEAT:
    args = dict(iterations=10, layer="block2", head_epochs=2, head_data=trained["train_x"][:256],
                head_channels=16, head_hidden=32, cache_dir=tmp_path / "cache")  # fmt: skip
    args.update(kw)
    return _attack(**args)


def test_beta_order_interleaves_from_the_middle() -> None:
    betas = [round(0.1 * i, 10) for i in range(10)]
    assert beta_order(betas) == [0.4, 0.5, 0.3, 0.6, 0.2, 0.7, 0.1, 0.8, 0.0, 0.9]
    assert beta_order(betas, schedule=False) == betas
    assert sorted(beta_order([0.0, 0.5, 1.0])) == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("shape,flat", [((640, 8, 8), 256), ((512, 4, 4), 64), ((7, 1, 1), 64), ((32,), 32)])
def test_head_template_fits_any_feature_shape(shape, flat) -> None:
    head = LatentHead(shape, num_classes=10)
    first_linear = next(m for m in head.modules() if isinstance(m, nn.Linear))
    assert first_linear.in_features == flat and first_linear.out_features == 256
    assert head(torch.zeros(2, *shape)).shape == (2, 10)
    if len(shape) == 3 and shape[1] >= 4:  # the official template: two k2 s2 convs, no bias
        convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
        assert [(c.kernel_size, c.stride, c.bias) for c in convs] == [((2, 2), (2, 2), None)] * 2


def test_default_layers_follow_the_architecture_table() -> None:
    def arch(name: str) -> nn.Module:
        return build_model(name, 10, [0.5] * 3, [0.25] * 3, width=0.0625)

    assert default_layers(arch("wrn34_10")) == (
        "block3.layer.3",
        ["block3.layer.1", "block3.layer.2", "block3.layer.3", "block3.layer.4"],
    )
    assert default_layers(arch("preact_resnet18")) == ("layer4.0", ["layer3.1", "layer4.0"])
    assert default_layers(arch("resnet18")) == ("layer4.0", ["layer3.1", "layer4.0"])
    layer, heads = default_layers(arch("wrn28_10"))  # the generic rule: penultimate block
    assert layer == "block3.layer.2" and heads[-1] == "block3.layer.3" and layer in heads
    with pytest.raises(ConfigError, match="layer"):
        default_layers(SmallNet())


def test_output_in_ball_and_box_and_misclassified_points_unchanged(trained, tmp_path) -> None:
    model, x, y = trained["model"], trained["x"].clone(), trained["y"]
    x[0], x[1] = 0.0, 1.0  # box boundary
    attack = _lafeat(trained, tmp_path, iterations=4)
    x_adv = attack(model, x, y)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() <= EPS
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.any() and torch.equal(x_adv[wrong], x[wrong])
    assert attack.forward_passes > 0 and attack.backward_passes > 0
    report = attack.report
    assert report["layer"] == "block2" and len(report["runs"]) == 10
    accs = [r["robust_accuracy"] for r in report["runs"]]
    assert accs == sorted(accs, reverse=True)  # every run only attacks points still robust


def test_points_that_stay_robust_come_back_perturbed(trained, tmp_path) -> None:
    """Layer-wise analyses read LAFEAT's x_adv: a robust point must be its perturbed input, not x."""
    model, x, y = trained["model"], trained["x"], trained["y"]
    x_adv = _lafeat(trained, tmp_path, iterations=4, betas=[0.5])(model, x, y)
    with torch.no_grad():
        right_before = model(x).argmax(1) == y
        right_after = model(x_adv).argmax(1) == y
    kept = right_before & right_after
    assert kept.any()
    moved = (x_adv[kept] - x[kept]).flatten(1).abs().amax(1)
    assert (moved > EPS / 2).all() and (moved <= EPS).all()


def test_deterministic_and_second_evaluation_reuses_cached_heads(trained, tmp_path) -> None:
    model, x, y = trained["model"], trained["x"], trained["y"]
    kw = {"betas": [0.3, 0.6], "iterations": 5}
    first = _lafeat(trained, tmp_path, **kw)
    a = first(model, x, y)
    assert first.heads.trained == 1 and first.report["heads"]["from_cache"] is False
    second = _lafeat(trained, tmp_path, **kw)  # a new evaluation: heads come from the disk cache
    b = second(model, x, y)
    assert second.heads.trained == 0 and second.report["heads"]["from_cache"] is True
    assert torch.equal(a, b)
    assert second.report["heads"]["agreement_last_epoch"] == first.report["heads"]["agreement_last_epoch"]
    second(model, x, y)  # the same weights again: the heads stay in memory
    assert second.heads.trained == 0
    # Other weights are another cache entry.
    other = SmallNet().eval()
    assert model_fingerprint(other) != model_fingerprint(model)
    third = _lafeat(trained, tmp_path, betas=[0.0], iterations=1, head_epochs=1)
    third(other, x[:4], y[:4])
    assert third.heads.trained == 1


def test_attack_runs_on_given_heads_without_training(trained, tmp_path) -> None:
    """The attack receives its heads: a trained set passed in directly gives the same attack, untrained."""
    model, x, y = trained["model"], trained["x"], trained["y"]
    cached = _lafeat(trained, tmp_path, betas=[0.3, 0.6], iterations=4)
    a = cached(model, x, y)
    given = cached.heads.last
    assert isinstance(given, LatentHeads) and given.layers == ["block2"]
    attack = LAFEAT(ThreatModel("linf", EPS), given, iterations=4, betas=[0.3, 0.6], layer="block2")
    b = attack(model, x, y)
    assert torch.equal(a, b) and attack.report["heads"] == cached.report["heads"]
    assert attack.describe()["head_data"] == "given"
    with pytest.raises(ConfigError, match="no trained head for layer"):
        LAFEAT(ThreatModel("linf", EPS), given, layer="block1")(model, x, y)


def test_cache_file_is_named_by_the_weights_and_the_head_settings(trained, tmp_path) -> None:
    """The cache key recipe is unchanged by the move out of the attack, so existing cache files load."""
    import hashlib
    import json

    model, x, y = trained["model"], trained["x"][:8], trained["y"][:8]
    attack = _lafeat(trained, tmp_path, iterations=1, betas=[0.0], head_epochs=1)
    attack(model, x, y)
    images = trained["train_x"][:256]
    config = {"layers": ["block2"], "num_classes": 10, "channels": 16, "hidden": 32, "epochs": 1,
              "samples": None, "batch_size": 128, "lr": 1e-3, "augment": True, "seed": 0,
              "data": {"tensor": list(images.shape), "sum": int(images.sum(dtype=torch.int64))}}  # fmt: skip
    key = hashlib.sha256((model_fingerprint(model) + json.dumps(config, sort_keys=True)).encode()).hexdigest()
    path = tmp_path / "cache" / f"{key[:40]}.pt"
    assert attack.report["heads"]["cache_file"] == str(path) and path.is_file()
    assert torch.load(path, weights_only=True)["key"] == key


def test_at_least_as_strong_as_pgd20(trained, tmp_path) -> None:
    model, x, y = trained["model"], trained["x"], trained["y"]
    threat = ThreatModel("linf", EPS)
    torch.manual_seed(0)
    x_pgd = PGD(threat, steps=20, step_size=EPS / 4)(model, x, y)
    x_laf = _lafeat(trained, tmp_path, iterations=10)(model, x, y)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
        pgd = (model(x_pgd).argmax(1) == y).float().mean().item()
        laf = (model(x_laf).argmax(1) == y).float().mean().item()
    assert pgd < clean  # the comparison is not vacuous
    assert laf <= pgd


def test_heads_learn_the_model_prediction_and_the_model_stays_frozen(tmp_path) -> None:
    """docs/methods/lafeat.md#heads, docs/methods/lafeat.md#tests: labels are the model's predictions; the
    model is never updated."""
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        model.fc.bias.zero_()
        model.fc.bias[3] = 100.0  # always predicts class 3
    model.train()  # the attack must put it in eval mode and restore train mode after
    modes: list[bool] = []
    model.block1.register_forward_hook(lambda m, i, o: modes.append(m.training))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = (torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    attack = _attack(iterations=1, layer="block2", head_epochs=15, head_data=images,
                    head_channels=8, head_hidden=16, head_lr=1e-2, cache_dir=tmp_path)  # fmt: skip
    x = to_float(images[:8])
    attack(model, x, torch.full((8,), 3))
    attack_modes = list(modes)
    heads = attack.heads.last
    assert attack.report["heads"]["agreement_last_epoch"]["block2"] == 100.0
    with torch.no_grad():
        _, feats = forward_with_features(model, x, ["block2"])
        assert (heads["block2"](feats["block2"]).argmax(1) == 3).all()
    assert attack_modes and not any(
        attack_modes
    )  # every forward of the attack and head training in eval mode
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())


def _start(x: torch.Tensor, eps: float, seed: int, draw: int = 0) -> torch.Tensor:
    """The APGD-style start of docs/methods/lafeat.md#attack from the `draw`-th uniform draw after seeding."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(draw + 1):
        t = torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1
    t = t / t.reshape(x.shape[0], -1).abs().max(dim=1).values.reshape(-1, *[1] * (x.dim() - 1))
    return torch.clamp(x + eps * t, 0, 1)


def _official_run(model: nn.Module, x, y, eps: float, n: int, seed: int, head: nn.Module | None = None,
                  beta: float = 0.0, target=None, draw: int = 0) -> torch.Tensor:  # fmt: skip
    """One run written from docs/methods/lafeat.md#attack, docs/methods/lafeat.md#targeted in the official
    loop's order, not from our code.

    Each iteration evaluates x_i, records the points fooled there, and only then steps, so x_N is
    never scored. `head=None` is docs/methods/lafeat.md#tests's "heads ignored" (β = 0). Fooled points come
    back where
    they were fooled (the official record); the others as x_{N-1} (our choice; officially clean x).
    """
    feats: dict[str, torch.Tensor] = {}
    hook = model.block2.register_forward_hook(lambda m, i, out: feats.update(f=out))
    lo, hi = torch.clamp(x - eps, min=0), torch.clamp(x + eps, max=1)
    cur = _start(x, eps, seed, draw)
    prev, best, fooled = cur, cur.clone(), torch.zeros_like(y, dtype=torch.bool)
    for i in range(n):
        step = eps * (1 + math.cos(math.pi * i / n))  # 2 eps (1 + cos) / 2
        v = cur.clone().requires_grad_(True)
        z = model(v)
        s_z = (z.detach().topk(2).values @ torch.tensor([1.0, -1.0], dtype=z.dtype) + 1e-8)[:, None]
        zc = z / s_z
        if head is not None:
            h = head(feats["f"])
            m_h = (h.detach().argmax(1) == y).to(z.dtype)[:, None]
            s_h = (h.detach().topk(2).values @ torch.tensor([1.0, -1.0], dtype=h.dtype) + 1e-8)[:, None]
            zc = beta * m_h * h / s_h + (1 - beta * m_h) * z / s_z
        loss = F.cross_entropy(zc, y, reduction="sum") if target is None else \
            -F.cross_entropy(zc, target, reduction="sum")  # fmt: skip
        grad = torch.autograd.grad(loss, v)[0]
        keep = (z.detach().argmax(1) == y).to(x.dtype).reshape(-1, 1, 1, 1)
        proposal = torch.min(torch.max(cur + keep * step * grad.sign(), lo), hi)
        a = 1.0 if i == 0 else 0.75
        nxt = torch.min(torch.max(cur + keep * (a * (proposal - cur) + (1 - a) * (cur - prev)), lo), hi)
        wrong = keep.flatten() == 0
        best[wrong] = nxt[wrong]  # what the official code records: x_{i+1}, frozen at x_i
        fooled |= wrong
        prev, cur = cur, nxt
    hook.remove()
    best[~fooled] = prev[~fooled]
    return best


def _float64_net(trained: dict) -> nn.Module:
    model = SmallNet().double().eval()
    model.load_state_dict({k: v.double() for k, v in trained["model"].state_dict().items()})
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_beta_zero_run_is_apgd_momentum_with_cosine_step_on_normalized_logits(trained) -> None:
    model = _float64_net(trained)
    x, y = trained["x"][:16].double(), trained["y"][:16]
    attack = _attack(iterations=7, layer="block2", head_data="attacked", seed=5)
    head = LatentHead((16, 4, 4), 10, 8, 8).double()
    ours = attack._run(model, head, "block2", x, y, beta=0.0, target=None)
    ref = _official_run(model, x, y, EPS_RUN, 7, seed=5)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_mixed_logits_follow_the_formula() -> None:
    """zc = β m_h h / s(h) + (1 - β m_h) z / s(z), s = top1 - top2 + 1e-8 on detached logits."""
    z = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]], dtype=torch.float64, requires_grad=True)
    h = torch.tensor([[1.0, 0.5, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0])  # the head predicts y for row 0 only (m_h = 1, 0)
    zc = mixed_logits(z, h, y, beta=0.3)
    s_z, s_h = torch.tensor([[2.0], [2.0]], dtype=torch.float64) + 1e-8, 0.5 + 1e-8
    expected = torch.stack([0.3 * h[0] / s_h + 0.7 * z[0] / s_z[0], z[1] / s_z[1]])
    torch.testing.assert_close(zc, expected, rtol=1e-12, atol=0)
    # Detached scales: the gradient is the fixed weights, not the scales' own derivative.
    gz, gh = torch.autograd.grad(zc.sum(), (z, h))
    torch.testing.assert_close(gh, torch.tensor([[0.3 / s_h] * 3, [0.0] * 3], dtype=torch.float64))
    torch.testing.assert_close(gz, (torch.tensor([[0.7], [1.0]], dtype=torch.float64) / s_z).expand(2, 3))


@pytest.mark.parametrize("beta,targeted", [(0.3, False), (1.0, False), (0.8, True)])
def test_mixed_run_matches_the_official_loop(trained, beta, targeted) -> None:
    """The latent term with its weight and normalization, against a loop written from the spec."""
    model = _float64_net(trained)
    x, y = trained["x"][:16].double(), trained["y"][:16]
    # A head close to the model's classifier: it agrees with y on some points (m_h = 1), not on all.
    head = nn.Sequential(nn.Flatten(), nn.Linear(256, 10)).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        noise = torch.randn(10, 256, generator=gen, dtype=torch.float64)
        head[1].weight.copy_(model.fc.weight + model.fc.weight.std() * noise)
        head[1].bias.copy_(model.fc.bias)
        z, feats = forward_with_features(model, x, ["block2"])
        on = (head(feats["block2"]).argmax(1) == y) & (z.argmax(1) == y)
    assert 4 <= int(on.sum()) <= 12  # the latent term is live on some points, masked on others
    target = z.argsort(1, descending=True)[:, 2] if targeted else None
    draw = 1 if targeted else 0
    attack = _attack(iterations=6, layer="block2", head_data="attacked", seed=3)
    ours = attack._run(model, head, "block2", x, y, beta, target, draw)
    ref = _official_run(model, x, y, EPS_RUN, 6, seed=3, head=head, beta=beta, target=target, draw=draw)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    without = attack._run(model, head, "block2", x, y, 0.0, target, draw)
    assert not torch.equal(ours, without)  # β moves the iterates here, so the match is not vacuous


class _Linear(nn.Module):
    """Two classes, fooled (class 1) once sum(x) > b; the gradient sign is +1 everywhere."""

    def __init__(self, b: float) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0] * 4, [1.0] * 4]))
            self.fc.bias.copy_(torch.tensor([0.0, -b]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(x))


def test_a_run_scores_x0_to_x_n_minus_1_never_x_n(tmp_path) -> None:
    """docs/methods/lafeat.md#attack: the official loop scores x_i before stepping, so a point only x_N fools
    stays robust.

    The first step (2 eps) saturates every pixel at x + eps: x_1 maximizes sum(x). With b between
    sum(x_0) and sum(x_1), N = 1 must leave the point robust at x_0 and N = 2 must fool it at x_1.
    """
    x, y = torch.full((1, 1, 2, 2), 0.5), torch.tensor([0])
    x0, x1 = _start(x, EPS_RUN, seed=0), x + EPS_RUN
    b = (max(x0.sum().item(), 2.0) + x1.sum().item()) / 2
    model = _Linear(b).eval()
    for n, fooled, expected in [(1, False, x0), (2, True, x1)]:
        attack = _attack(iterations=n, betas=[0.0], layer="flat", head_epochs=0,
                        head_data="attacked", cache_dir=tmp_path)  # fmt: skip
        x_adv = attack(model, x, y)
        with torch.no_grad():
            assert (model(x_adv).argmax(1) != y).item() is fooled, n
        torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-7)
        assert attack.report["runs"][-1]["robust_accuracy"] == (0.0 if fooled else 100.0)


def test_targeted_runs_draw_a_fresh_start_per_target(tmp_path, monkeypatch) -> None:
    """docs/methods/lafeat.md#targeted: the official targeted attack reseeds once per beta, then each target
    takes the next
    random start; the untargeted runs reseed every run (the same start for every beta)."""
    torch.manual_seed(0)
    model = SmallNet().eval()
    with torch.no_grad():
        model.fc.bias[3] = 100.0  # always class 3: no start fools, so every run sees the same batch
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.full((6,), 3)
    # N = 0: a run returns its start unchanged.
    attack = _attack(iterations=0, betas=[0.0, 0.5], targeted=True, n_targets=3,
                    layer="block2", head_epochs=0, head_data="attacked", seed=4,
                    cache_dir=tmp_path)  # fmt: skip
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    run = attack._run

    def spy(*args, **kw):
        out = run(*args, **kw)
        calls.append((args[3], out))
        return out

    monkeypatch.setattr(attack, "_run", spy)
    attack(model, x, y)
    # Runs: untargeted β 0, 0.5; then β 0 with target ranks 2, 3, 4; then β 0.5 with ranks 2, 3, 4.
    draws = [0, 0, 0, 1, 2, 0, 1, 2]
    assert len(calls) == len(draws)
    for (xb, start), draw in zip(calls, draws):
        torch.testing.assert_close(start, _start(xb, EPS_RUN, seed=4, draw=draw), rtol=0, atol=1e-7)
    targets = [start for _, start in calls[2:5]]
    assert not torch.equal(targets[0], targets[1]) and not torch.equal(targets[1], targets[2])


def test_targeted_mode_adds_one_run_per_beta_and_target(trained, tmp_path) -> None:
    model, x, y = trained["model"], trained["x"][:16], trained["y"][:16]
    attack = _lafeat(trained, tmp_path, iterations=3, betas=[0.0, 0.5], targeted=True, n_targets=3)
    x_adv = attack(model, x, y)
    assert attack.name == "lafeat_targeted"
    runs = attack.report["runs"]
    assert [(r["beta"], r["target_rank"]) for r in runs] == [
        (0.0, None), (0.5, None), (0.0, 2), (0.0, 3), (0.0, 4), (0.5, 2), (0.5, 3), (0.5, 4)
    ]  # fmt: skip
    assert (x_adv - x).abs().max() <= EPS and x_adv.min() >= 0 and x_adv.max() <= 1


def test_restores_mode_and_requires_grad_even_on_error(trained, tmp_path) -> None:
    model = SmallNet().train()
    model.fc.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x, y = trained["x"][:4], trained["y"][:4]
    _lafeat(trained, tmp_path, iterations=2, betas=[0.0], head_epochs=1)(model, x, y)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(ConfigError, match="nope"):
        _lafeat(trained, tmp_path, layer="nope")(model, x, y)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"iterations": -1}, "iterations"),
        ({"betas": [0.2, 1.5]}, "betas"),
        ({"betas": []}, "betas"),
        ({"head_epochs": 1.5}, "head_epochs"),
        ({"head_lr": 0.0}, "head_lr"),
        ({"head_data": "test"}, "head_data"),
        ({"head_data": "train"}, "head_dataset"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_values_raise_config_error(kw, match) -> None:
    args = {"head_data": "attacked", **kw}
    with pytest.raises(ConfigError, match=match):
        _attack(**args)


def test_l2_threat_is_refused() -> None:
    with pytest.raises(ConfigError, match="L-inf"):
        build_attack({"name": "lafeat", "head_data": "attacked"}, ThreatModel("l2", 0.5))


def test_presets_compose_and_build(compose, tmp_path) -> None:
    from robust_train.builders import threat_from_config
    from robust_train.config import validate_train_config
    from robust_train.evaluation import build_suite

    cfg = compose(["eval=paper_slim", "logger=none", "+attack@eval.attacks.lafeat_full=lafeat_full"])
    validate_train_config(cfg)
    assert list(cfg.eval.attacks) == ["clean", "pgd20", "autoattack", "lafeat", "ssa", "lafeat_full"]
    suite = build_suite(cfg.eval, threat_from_config(cfg.threat))
    lafeat, full = suite["lafeat"], suite["lafeat_full"]
    assert isinstance(lafeat, LAFEAT) and lafeat.iterations == 100 and not lafeat.targeted
    assert isinstance(lafeat.heads, HeadCache)  # the suite hands the attack its heads source
    assert lafeat.heads.settings.dataset["name"] == "mnist5k" and lafeat.heads.settings.epochs == 100
    assert full.iterations == 1000 and full.targeted and full.describe()["n_targets"] == 9
    assert lafeat.describe()["betas"] == [0.4, 0.5, 0.3, 0.6, 0.2, 0.7, 0.1, 0.8, 0.0, 0.9]
    bad = compose(["eval=full", "logger=none", "eval.attacks.lafeat.head_epochs=-2",
                   "eval.attacks.lafeat.betas=[0.1,3]"])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        validate_train_config(bad)
    assert "eval.attacks.lafeat.head_epochs" in str(err.value) and "eval.attacks.lafeat.betas.1" in str(
        err.value
    )
    assert list(compose(["eval=default"]).eval.attacks) == ["clean", "pgd20", "cw20", "autoattack_lite"]


def test_cache_dir_defaults_to_robust_train_cache(monkeypatch, tmp_path) -> None:
    from robust_train.attacks.lafeat_heads import default_cache_dir

    monkeypatch.setenv("ROBUST_TRAIN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "lafeat"
    monkeypatch.delenv("ROBUST_TRAIN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "robust-train" / "lafeat"
