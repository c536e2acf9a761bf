"""The RobustBench-compatible architectures: their checkpoints' key layout and forward, written out here.

Each test builds a state_dict in RobustBench's key layout from a description of its architecture (no
robustbench import, nothing downloaded), loads it strictly, and compares our forward with a functional
re-implementation of RobustBench's forward over those tensors:
- DMWideResNet (robustbench/model_zoo/architectures/dm_wide_resnet.py) -> wrn28_10_silu, wrn70_16_silu, ...
- WideResNet(34, 20) (architectures/wide_resnet.py) -> wrn34_20
- Wong2020FastNet (model_zoo/cifar10.py: PreActResNet(PreActBlock, [2, 2, 2, 2]) with mu/sigma) ->
  preact_resnet18_wong
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from robust_train.errors import ConfigError
from robust_train.models import build_model, count_parameters, scale_channels
from robust_train.models.dm_wide_resnet import DM_STATS, DM_WIDE_RESNETS

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
TINY = 0.0625
StateDict = dict[str, Tensor]


# ----------------------------------------------------------------------------- RobustBench key layouts


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.weight", (c,)),
        (f"{prefix}.bias", (c,)),
        (f"{prefix}.running_mean", (c,)),
        (f"{prefix}.running_var", (c,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def dm_layout(depth: int, k: int, classes: int, width: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of RobustBench's DMWideResNet(num_classes, depth, k) state_dict, in module order."""
    n = (depth - 4) // 6
    c = [scale_channels(v, width) for v in (16, 16 * k, 32 * k, 64 * k)]
    keys: list[tuple[str, tuple[int, ...]]] = [("init_conv.weight", (c[0], 3, 3, 3))]
    for g in range(3):
        for i in range(n):
            cin, cout = (c[g] if i == 0 else c[g + 1]), c[g + 1]
            p = f"layer.{g}.block.{i}"
            keys += _bn(f"{p}.batchnorm_0", cin) + [(f"{p}.conv_0.weight", (cout, cin, 3, 3))]
            keys += _bn(f"{p}.batchnorm_1", cout) + [(f"{p}.conv_1.weight", (cout, cout, 3, 3))]
            if cin != cout:
                keys.append((f"{p}.shortcut.weight", (cout, cin, 1, 1)))
    keys += _bn("batchnorm", c[3]) + [("logits.weight", (classes, c[3])), ("logits.bias", (classes,))]
    return keys


def trades_wrn_layout(
    depth: int, k: int, classes: int, width: float = 1.0
) -> list[tuple[str, tuple[int, ...]]]:
    """RobustBench's WideResNet(depth, k) (the TRADES WRN, sub_block1=False)."""
    n = (depth - 4) // 6
    c = [scale_channels(v, width) for v in (16, 16 * k, 32 * k, 64 * k)]
    keys: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (c[0], 3, 3, 3))]
    for g in range(3):
        for i in range(n):
            cin, cout = (c[g] if i == 0 else c[g + 1]), c[g + 1]
            p = f"block{g + 1}.layer.{i}"
            keys += _bn(f"{p}.bn1", cin) + [(f"{p}.conv1.weight", (cout, cin, 3, 3))]
            keys += _bn(f"{p}.bn2", cout) + [(f"{p}.conv2.weight", (cout, cout, 3, 3))]
            if cin != cout:
                keys.append((f"{p}.convShortcut.weight", (cout, cin, 1, 1)))
    keys += _bn("bn1", c[3]) + [("fc.weight", (classes, c[3])), ("fc.bias", (classes,))]
    return keys


def wong_layout(classes: int, width: float = 1.0) -> list[tuple[str, tuple[int, ...]]]:
    """RobustBench's Wong2020Fast checkpoint (its mu/sigma buffers are not in the file)."""
    cin = scale_channels(64, width)
    keys: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (cin, 3, 3, 3))]
    for s, planes in enumerate((64, 128, 256, 512)):
        cout = scale_channels(planes, width)
        for b in range(2):
            p = f"layer{s + 1}.{b}"
            keys += _bn(f"{p}.bn1", cin) + [(f"{p}.conv1.weight", (cout, cin, 3, 3))]
            keys += _bn(f"{p}.bn2", cout) + [(f"{p}.conv2.weight", (cout, cout, 3, 3))]
            if s > 0 and b == 0:
                keys.append((f"{p}.shortcut.0.weight", (cout, cin, 1, 1)))
            cin = cout
    return keys + [("linear.weight", (classes, cin)), ("linear.bias", (classes,))]


def random_state(layout: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> StateDict:
    """Tensors of the layout's shapes with non-trivial BN statistics (so eval mode is tested too), in
    float64 so that the two forwards agree to rounding of a few ulps through tens of layers."""
    g = torch.Generator().manual_seed(seed)
    out: StateDict = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", ".bias")):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BN weight
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return {k: v.double() if v.is_floating_point() else v for k, v in out.items()}


# ----------------------------------------------------------------------------- RobustBench's forwards


def _bn_f(sd: StateDict, p: str, x: Tensor, train: bool) -> Tensor:
    stats = sd[f"{p}.running_mean"].clone(), sd[f"{p}.running_var"].clone()
    return F.batch_norm(x, *stats, sd[f"{p}.weight"], sd[f"{p}.bias"], training=train)


def dm_forward(sd: StateDict, x: Tensor, depth: int, mean: tuple, std: tuple, train: bool = False) -> Tensor:
    """DMWideResNet.forward: (x - mean) / std, explicit SAME padding, Swish, avg_pool2d(8).

    mean/std are float32 tensors in RobustBench (and in our Normalize), cast to x's dtype here."""
    n = (depth - 4) // 6
    out = (x - torch.tensor(mean).to(x.dtype).view(3, 1, 1)) / torch.tensor(std).to(x.dtype).view(3, 1, 1)
    out = F.conv2d(out, sd["init_conv.weight"], padding=1)
    for g in range(3):
        for i in range(n):
            p = f"layer.{g}.block.{i}"
            stride = 2 if (g > 0 and i == 0) else 1
            has_shortcut = f"{p}.shortcut.weight" in sd
            a = F.silu(_bn_f(sd, f"{p}.batchnorm_0", out, train))
            v = F.pad(a, (1, 1, 1, 1)) if stride == 1 else F.pad(a, (0, 1, 0, 1))
            h = F.conv2d(v, sd[f"{p}.conv_0.weight"], stride=stride)
            h = F.conv2d(F.silu(_bn_f(sd, f"{p}.batchnorm_1", h, train)), sd[f"{p}.conv_1.weight"], padding=1)
            skip = F.conv2d(a, sd[f"{p}.shortcut.weight"], stride=stride) if has_shortcut else out
            out = skip + h
    out = F.silu(_bn_f(sd, "batchnorm", out, train))
    out = F.avg_pool2d(out, 8).flatten(1)
    return F.linear(out, sd["logits.weight"], sd["logits.bias"])


def trades_wrn_forward(sd: StateDict, x: Tensor, depth: int) -> Tensor:
    """RobustBench WideResNet.forward (no normalization), eval mode."""
    n = (depth - 4) // 6
    out = F.conv2d(x, sd["conv1.weight"], padding=1)
    for g in range(3):
        for i in range(n):
            p = f"block{g + 1}.layer.{i}"
            stride = 2 if (g > 0 and i == 0) else 1
            a = F.relu(_bn_f(sd, f"{p}.bn1", out, False))
            h = F.conv2d(a, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            h = F.conv2d(F.relu(_bn_f(sd, f"{p}.bn2", h, False)), sd[f"{p}.conv2.weight"], padding=1)
            skip = (
                F.conv2d(a, sd[f"{p}.convShortcut.weight"], stride=stride)
                if f"{p}.convShortcut.weight" in sd
                else out
            )
            out = skip + h
    out = F.avg_pool2d(F.relu(_bn_f(sd, "bn1", out, False)), 8).flatten(1)
    return F.linear(out, sd["fc.weight"], sd["fc.bias"])


def wong_forward(sd: StateDict, x: Tensor) -> Tensor:
    """Wong2020FastNet.forward: (x - mu) / sigma, PreAct blocks whose shortcut reads x, no final BN."""
    out = (x - torch.tensor(CIFAR10_MEAN).to(x.dtype).view(1, 3, 1, 1)) / torch.tensor(
        CIFAR10_STD, dtype=x.dtype
    ).view(1, 3, 1, 1)
    out = F.conv2d(out, sd["conv1.weight"], padding=1)
    for s in range(4):
        for b in range(2):
            p = f"layer{s + 1}.{b}"
            stride = 2 if (s > 0 and b == 0) else 1
            a = F.relu(_bn_f(sd, f"{p}.bn1", out, False))
            skip = (
                F.conv2d(out, sd[f"{p}.shortcut.0.weight"], stride=stride)
                if f"{p}.shortcut.0.weight" in sd
                else out
            )
            h = F.conv2d(a, sd[f"{p}.conv1.weight"], stride=stride, padding=1)
            out = F.conv2d(F.relu(_bn_f(sd, f"{p}.bn2", h, False)), sd[f"{p}.conv2.weight"], padding=1) + skip
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.linear(out, sd["linear.weight"], sd["linear.bias"])


def images(n: int = 3, seed: int = 1) -> Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def build(name: str, **kwargs) -> torch.nn.Module:
    """A tiny model in float64 (the references compute in float64)."""
    return build_model(name, 10, CIFAR10_MEAN, CIFAR10_STD, width=TINY, **kwargs).double()


def _assert_layout(model: torch.nn.Module, layout: list[tuple[str, tuple[int, ...]]]) -> None:
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == layout  # same keys, same shapes, same order


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("name", "depth", "k"), [("wrn28_10_silu", 28, 10), ("wrn70_16_silu", 70, 16)])
def test_dm_wide_resnet_loads_a_robustbench_state_dict_and_computes_its_forward(name, depth, k) -> None:
    layout = dm_layout(depth, k, 10, TINY)
    model = build(name)
    _assert_layout(model, layout)
    sd = random_state(layout)
    model.load_state_dict(sd, strict=True)  # no renaming, no mean/std keys needed
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), dm_forward(sd, x, depth, CIFAR10_MEAN, CIFAR10_STD))
        # Train mode (batch statistics): the block structure, not only the running averages.
        torch.testing.assert_close(
            model.train()(x), dm_forward(sd, x, depth, CIFAR10_MEAN, CIFAR10_STD, train=True)
        )


@pytest.mark.parametrize(("name", "depth", "k"), [(n, d, k) for n, d, k in DM_WIDE_RESNETS])
def test_every_dm_wide_resnet_has_robustbench_keys_at_full_width(name, depth, k) -> None:
    with torch.device("meta"):
        model = build_model(name, 100, CIFAR10_MEAN, CIFAR10_STD)
    _assert_layout(model, dm_layout(depth, k, 100))


def _dm_params(depth: int, k: int, classes: int) -> int:
    """Parameter count of a DMWideResNet by arithmetic (convs without bias, BN weight+bias, linear)."""
    n = (depth - 4) // 6
    c = [16, 16 * k, 32 * k, 64 * k]
    total = 27 * c[0]
    for g in range(3):
        cin, cout = c[g], c[g + 1]
        total += 2 * cin + 9 * cin * cout + 2 * cout + 9 * cout * cout + cin * cout  # first block
        total += (n - 1) * (4 * cout + 18 * cout * cout)
    return total + 2 * c[3] + c[3] * classes + classes


def test_parameter_counts_by_arithmetic_and_tiny_at_width_1_16() -> None:
    assert _dm_params(28, 10, 10) == 36_479_194  # ~36.5M
    assert _dm_params(70, 16, 10) == 266_796_506  # ~267M
    for name, depth, k in DM_WIDE_RESNETS:
        with torch.device("meta"):
            model = build_model(name, 10, CIFAR10_MEAN, CIFAR10_STD)
        assert count_parameters(model) == _dm_params(depth, k, 10), name
    # The width multiplier makes every one of them CPU-test sized: channels x 1/16, parameters ~ x 1/256.
    full_counts = {"wrn28_10_silu": 36_479_194, "wrn70_16_silu": 266_796_506, "wrn34_20": 184_531_674,
                   "preact_resnet18_wong": 11_171_146}  # fmt: skip
    for name, full in full_counts.items():
        tiny = count_parameters(build_model(name, 10, CIFAR10_MEAN, CIFAR10_STD, width=TINY))
        assert tiny < full / 200 and tiny < 1_100_000, (name, tiny)


def test_dm_normalization_inside_the_model_and_its_stats_option() -> None:
    x = images()
    sd = random_state(dm_layout(28, 10, 10, TINY), seed=3)
    # The DM code's CIFAR-10 constants are our CIFAR-10 loader's: `dataset` and `cifar10` agree there.
    by_dataset = build("wrn28_10_silu").eval()
    by_dm = (
        build_model("wrn28_10_silu", 10, (0.0,) * 3, (1.0,) * 3, width=TINY, stats="cifar10").double().eval()
    )
    c100 = build("wrn28_10_silu", stats="cifar100").eval()
    for model in (by_dataset, by_dm, c100):
        model.load_state_dict(sd)
        assert not any("mean" == k or "std" == k or k.startswith("normalize") for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(by_dm(x), by_dataset(x))
        mean100, std100 = DM_STATS["cifar100"]
        torch.testing.assert_close(c100(x), dm_forward(sd, x, 28, mean100, std100))
        # normalize=none feeds raw [0, 1] pixels (mean 0, std 1).
        raw = build("wrn28_10_silu", normalize="none").eval()
        raw.load_state_dict(sd)
        torch.testing.assert_close(raw(x), dm_forward(sd, x, 28, (0.0,) * 3, (1.0,) * 3))
    with pytest.raises(ConfigError, match=r"model\.stats='imagenet' is not allowed"):
        build_model("wrn28_10_silu", 10, CIFAR10_MEAN, CIFAR10_STD, width=TINY, stats="imagenet")


def test_dm_bn_momentum_option() -> None:
    model = build_model("wrn70_16_silu", 10, CIFAR10_MEAN, CIFAR10_STD, width=TINY, bn_momentum=0.01)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.01 for m in bns)
    default = build_model("wrn70_16_silu", 10, CIFAR10_MEAN, CIFAR10_STD, width=TINY)
    assert all(m.momentum == 0.1 for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_dm_head_is_logits_and_fc_is_the_same_module() -> None:
    model = build_model("wrn28_10_silu", 10, CIFAR10_MEAN, CIFAR10_STD, width=TINY)
    assert model.fc is model.logits and model.get_submodule("fc") is model.logits
    assert not any(k.startswith("fc.") for k in model.state_dict())


def test_wrn34_20_is_robustbench_wide_resnet_34_20() -> None:
    layout = trades_wrn_layout(34, 20, 10, TINY)
    model = build("wrn34_20", normalize="none").eval()
    _assert_layout(model, layout)
    with torch.device("meta"):
        _assert_layout(build_model("wrn34_20", 10, CIFAR10_MEAN, CIFAR10_STD), trades_wrn_layout(34, 20, 10))
    sd = random_state(layout, seed=4)
    model.load_state_dict(sd, strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), trades_wrn_forward(sd, x, 34))


def test_preact_resnet18_wong_is_robustbench_wong2020fast() -> None:
    layout = wong_layout(10, TINY)
    model = build("preact_resnet18_wong").eval()
    _assert_layout(model, layout)
    with torch.device("meta"):
        full = build_model("preact_resnet18_wong", 10, CIFAR10_MEAN, CIFAR10_STD)
    _assert_layout(full, wong_layout(10))
    assert full.fc is full.linear
    sd = random_state(layout, seed=5)
    model.load_state_dict(sd, strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), wong_forward(sd, x))


@pytest.mark.parametrize(
    ("name", "build_ref"),
    [
        ("wrn28_10_silu", lambda sd, x: dm_forward(sd, x, 28, CIFAR10_MEAN, CIFAR10_STD)),
        ("preact_resnet18_wong", wong_forward),
    ],
)
def test_gradients_flow_like_the_reference(
    name: str, build_ref: Callable[[StateDict, Tensor], Tensor]
) -> None:
    # Input gradients drive every attack: they must match the reference's too.
    model = build(name).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x = images().requires_grad_(True)
    (g_ours,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x)
    (g_ref,) = torch.autograd.grad(build_ref(sd, x).logsumexp(1).sum(), x)
    torch.testing.assert_close(g_ours, g_ref)
