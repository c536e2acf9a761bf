"""Architectures, normalization, feature capture and checkpoint-compatibility checks (CPU, tiny widths)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn

from robust_train.config import validate_train_config
from robust_train.errors import CheckpointError, ConfigError
from robust_train.models import (
    MODEL_NAMES,
    Normalize,
    RobustModel,
    build_model,
    capture_features,
    check_state_dict_compatible,
    count_parameters,
    filter_state_dict,
    forward_with_features,
    scale_channels,
)
from robust_train.models.dm_wide_resnet import DM_WIDE_RESNETS
from robust_train.registry import MODELS

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2471, 0.2435, 0.2616)
TINY = 0.125
CONF_DIR = Path(__file__).resolve().parents[2] / "robust_train" / "conf" / "model"
DM_NAMES = [name for name, _, _ in DM_WIDE_RESNETS]

# Stage-output names per architecture and the number of block outputs.
EXPECTED_STAGES = {
    "preact_resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "wrn34_10": ["block1", "block2", "block3"],
    "wrn28_10": ["block1", "block2", "block3"],
    "preact_resnet56": ["layer1", "layer2", "layer3"],
    "vgg16_bn": ["stage1", "stage2", "stage3", "stage4", "stage5"],
    "mobilenet_v2": ["stage1", "stage2", "stage3", "stage4"],
    "wrn34_20": ["block1", "block2", "block3"],
    "preact_resnet18_wong": ["layer1", "layer2", "layer3", "layer4"],
    **{name: ["layer.0", "layer.1", "layer.2"] for name in DM_NAMES},
}
EXPECTED_NUM_BLOCKS = {
    "preact_resnet18": 8,
    "resnet18": 8,
    "wrn34_10": 15,
    "wrn28_10": 12,
    "preact_resnet56": 27,
    "vgg16_bn": 13,
    "mobilenet_v2": 17,
    "wrn34_20": 15,
    "preact_resnet18_wong": 8,
    **{name: 3 * (depth - 4) // 6 for name, depth, _ in DM_WIDE_RESNETS},
}
# (10 classes, 100 classes). PRN-18 and WRN-34-10 are the spec's numbers; ResNet-18, WRN-28-10,
# VGG16-BN and MobileNetV2 match the usual CIFAR reference implementations.
EXPECTED_PARAMS = {
    "preact_resnet18": (11_172_170, 11_218_340),
    "resnet18": (11_173_962, 11_220_132),
    "wrn34_10": (46_160_474, 46_218_164),
    "wrn28_10": (36_479_194, 36_536_884),
    "preact_resnet56": (855_578, 861_428),
    "vgg16_bn": (14_728_266, 14_774_436),
    "mobilenet_v2": (2_236_682, 2_351_972),
    # RobustBench's WideResNet(34, 20); Wong2020Fast is PreActResNet-18 without its final BN (-1,024).
    "wrn34_20": (184_531_674, 184_646_964),
    "preact_resnet18_wong": (11_171_146, 11_217_316),
    # The DMWideResNets: WRN-28-10 as the ReLU one, WRN-70-16 ~ 267M (also checked by arithmetic below).
    "wrn28_10_silu": (36_479_194, 36_536_884),
    "wrn34_10_silu": (46_160_474, 46_218_164),
    "wrn34_20_silu": (184_531_674, 184_646_964),
    "wrn70_16_silu": (266_796_506, 266_888_756),
    "wrn82_8_silu": (79_125_466, 79_171_636),
    "wrn94_16_silu": (365_915_610, 366_007_860),
    "wrn106_16_silu": (415_475_162, 415_567_412),
}
# Stage output shapes (C, H, W) at width 1 for 32x32 input (slim.md b.5 for the ResNets / WRN).
FULL_WIDTH_STAGE_SHAPES = {
    "preact_resnet18": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
    "resnet18": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
    "wrn34_10": [(160, 32, 32), (320, 16, 16), (640, 8, 8)],
    "wrn28_10": [(160, 32, 32), (320, 16, 16), (640, 8, 8)],
    "preact_resnet56": [(16, 32, 32), (32, 16, 16), (64, 8, 8)],
    "vgg16_bn": [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512, 1, 1)],
    "mobilenet_v2": [(24, 32, 32), (32, 16, 16), (96, 8, 8), (320, 4, 4)],
    "wrn34_20": [(320, 32, 32), (640, 16, 16), (1280, 8, 8)],
    "preact_resnet18_wong": [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)],
    **{name: [(16 * k, 32, 32), (32 * k, 16, 16), (64 * k, 8, 8)] for name, _, k in DM_WIDE_RESNETS},
}
FEATURE_DIM = {
    "preact_resnet18": 512,
    "resnet18": 512,
    "wrn34_10": 640,
    "wrn28_10": 640,
    "preact_resnet56": 64,
    "vgg16_bn": 512,
    "mobilenet_v2": 1280,
    "wrn34_20": 1280,
    "preact_resnet18_wong": 512,
    **{name: 64 * k for name, _, k in DM_WIDE_RESNETS},
}


def tiny(name: str, num_classes: int = 10, normalize: str = "meanstd", seed: int = 0) -> RobustModel:
    torch.manual_seed(seed)
    return build_model(name, num_classes, MEAN, STD, width=TINY, normalize=normalize).eval()


def on_meta(name: str, num_classes: int = 10) -> RobustModel:
    """Full-width model without allocating weights (shapes and counts only)."""
    with torch.device("meta"):
        return build_model(name, num_classes, MEAN, STD).eval()


def images(size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def all_forward_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


# ----------------------------------------------------------------------------- shapes and interface


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shape_and_interface(name: str) -> None:
    model = tiny(name)
    x = images()
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        assert torch.equal(model.fc(feats), logits)
    assert logits.shape == (2, 10)
    assert isinstance(model.fc, nn.Linear)
    assert feats.shape == (2, model.fc.in_features)
    assert model.fc.in_features == scale_channels(FEATURE_DIM[name], TINY)
    assert model.arch == name
    assert model.num_classes == 10
    assert model.feature_layers == EXPECTED_STAGES[name]
    assert model.feature_layer_names() == EXPECTED_STAGES[name]
    assert model.feature_layer_names("block") == model.block_layers
    assert len(model.block_layers) == EXPECTED_NUM_BLOCKS[name]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_tiny_imagenet_resolution(name: str) -> None:
    model = tiny(name, num_classes=200)
    with torch.no_grad():
        logits, feats = forward_with_features(model, images(64), model.feature_layers)
    assert logits.shape == (2, 200)
    # Every stage runs at twice the 32x32 resolution.
    for layer, (_, h, w) in zip(model.feature_layers, FULL_WIDTH_STAGE_SHAPES[name], strict=True):
        assert feats[layer].shape[-2:] == (2 * h, 2 * w)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameter_counts(name: str) -> None:
    k10, k100 = EXPECTED_PARAMS[name]
    assert count_parameters(on_meta(name, 10)) == k10
    assert count_parameters(on_meta(name, 100)) == k100


def test_trades_wrn_with_sub_block_count() -> None:
    # The TRADES/MART WRN-34-10 adds an unused copy of block1 (`sub_block1`).
    model = on_meta("wrn34_10")
    assert count_parameters(model) + count_parameters(model.block1) == 48_262_586


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_width_stage_shapes(name: str) -> None:
    model = on_meta(name)
    with torch.device("meta"):
        x = torch.empty(2, 3, 32, 32)
    _, feats = forward_with_features(model, x, model.feature_layers)
    assert [tuple(feats[n].shape[1:]) for n in model.feature_layers] == FULL_WIDTH_STAGE_SHAPES[name]


def test_preact_resnet18_tiny_feature_shapes() -> None:
    model = tiny("preact_resnet18")
    assert model.block_layers == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    with torch.no_grad():
        _, feats = forward_with_features(model, images(), model.block_layers + model.feature_layers)
    expected = {"layer1": (8, 32, 32), "layer2": (16, 16, 16), "layer3": (32, 8, 8), "layer4": (64, 4, 4)}
    for stage, shape in expected.items():
        assert feats[stage].shape == (2, *shape)
        assert feats[f"{stage}.0"].shape == (2, *shape)
        assert torch.equal(feats[f"{stage}.1"], feats[stage])


@pytest.mark.parametrize(("name", "blocks"), [("wrn34_10", 5), ("wrn28_10", 4)])
def test_wrn_block_names(name: str, blocks: int) -> None:
    model = tiny(name)
    assert model.block_layers == [f"block{s}.layer.{i}" for s in (1, 2, 3) for i in range(blocks)]
    with torch.no_grad():
        _, feats = forward_with_features(model, images(), model.block_layers)
    assert feats["block1.layer.0"].shape == (2, 20, 32, 32)
    assert feats[f"block2.layer.{blocks - 1}"].shape == (2, 40, 16, 16)
    assert feats["block3.layer.3"].shape == (2, 80, 8, 8)


def test_preact_resnet56_structure() -> None:
    model = on_meta("preact_resnet56")
    # Projection shortcuts only in the two stride-2 blocks.
    with_projection = [n for n in model.block_layers if model.get_submodule(n).shortcut is not None]
    assert with_projection == ["layer2.0", "layer3.0"]
    assert model.conv1.out_channels == 16


def test_width_scaling() -> None:
    assert scale_channels(64, 0.125) == 8
    assert scale_channels(3, 0.1) == 1
    assert scale_channels(160, 0.5) == 80
    model = tiny("mobilenet_v2")
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)


def test_train_mode_backward() -> None:
    model = tiny("wrn34_10").train()
    model(images()).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------- normalization


def test_normalize_layer_matches_manual() -> None:
    x = images()
    norm = Normalize(MEAN, STD)
    manual = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), manual)
    assert list(norm.parameters()) == []
    assert {n for n, _ in norm.named_buffers()} == {"mean", "std"}
    assert norm.double()(x.double()).dtype == torch.float64


def test_model_normalize_equals_manual_normalization() -> None:
    with_norm = tiny("preact_resnet18", normalize="meanstd")
    without = tiny("preact_resnet18", normalize="none", seed=5)
    # Normalization buffers are not in the state dict, so both modes share checkpoints.
    assert with_norm.state_dict().keys() == without.state_dict().keys()
    without.load_state_dict(with_norm.state_dict())
    assert isinstance(without.normalize, nn.Identity)
    x = images()
    manual = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(with_norm(x), without(manual))


# ----------------------------------------------------------------------------- feature capture


def test_capture_matches_manual_hook_and_cleans_up() -> None:
    model = tiny("preact_resnet18")
    x = images()
    manual: dict[str, torch.Tensor] = {}
    handle = model.layer3.register_forward_hook(lambda _m, _i, out: manual.__setitem__("out", out))
    with torch.no_grad():
        expected_logits = model(x)
    handle.remove()
    assert all_forward_hooks(model) == 0

    with capture_features(model, ["layer3", "layer4.0"]) as feats:
        assert all_forward_hooks(model) == 2
        with torch.no_grad():
            logits = model(x)
    assert all_forward_hooks(model) == 0
    assert torch.equal(logits, expected_logits)
    assert torch.equal(feats["layer3"], manual["out"])
    assert set(feats) == {"layer3", "layer4.0"}


def test_capture_removes_hooks_on_error() -> None:
    model = tiny("wrn28_10")
    with pytest.raises(RuntimeError, match="boom"), capture_features(model, ["block3.layer.3", "block2"]):
        assert all_forward_hooks(model) == 2
        raise RuntimeError("boom")
    assert all_forward_hooks(model) == 0


def test_capture_detach_and_gradients() -> None:
    model = tiny("preact_resnet18")
    x = images()
    logits, feats = forward_with_features(model, x, ["layer2"])
    assert feats["layer2"].requires_grad
    feats["layer2"].pow(2).mean().backward()
    assert model.conv1.weight.grad is not None
    assert model.fc.weight.grad is None  # fc lies after the captured layer
    with capture_features(model, ["layer2"], detach=True) as detached:
        model(x)
    assert not detached["layer2"].requires_grad
    torch.testing.assert_close(detached["layer2"], feats["layer2"].detach())
    assert logits.shape == (2, 10)


def test_capture_any_submodule_name() -> None:
    # Finer taps than blocks (e.g. `layer4.0.conv1`, used by some LAFEAT variants) also work.
    model = tiny("resnet18")
    with torch.no_grad():
        _, feats = forward_with_features(model, images(), ["layer4.0.conv1"])
    assert feats["layer4.0.conv1"].shape == (2, 64, 4, 4)


@pytest.mark.parametrize("bad", ["layer5", "layer4.7", "fc.weight", ""])
def test_unknown_layer_raises(bad: str) -> None:
    model = tiny("preact_resnet18")
    with pytest.raises(ConfigError) as info, capture_features(model, ["layer1", bad]):
        pass
    message = str(info.value)
    assert repr(bad) in message and "layer4.1" in message and "layer3" in message
    assert all_forward_hooks(model) == 0


def test_bad_granularity_raises() -> None:
    with pytest.raises(ConfigError, match="granularity"):
        tiny("vgg16_bn").feature_layer_names("pixel")


# ----------------------------------------------------------------------------- builder errors and configs


def test_unknown_model_raises() -> None:
    with pytest.raises(
        ConfigError, match=r"model\.name='foo' is not a known model; allowed: preact_resnet18"
    ):
        build_model("foo", 10, MEAN, STD)


def test_bad_options_raise() -> None:
    with pytest.raises(ConfigError, match=r"model\.normalize"):
        build_model("resnet18", 10, MEAN, STD, normalize="imagenet")
    with pytest.raises(ConfigError, match=r"model\.width"):
        build_model("resnet18", 10, MEAN, STD, width=0.0)
    with pytest.raises(ConfigError, match=r"model\.drop_rate"):
        build_model("resnet18", 10, MEAN, STD, drop_rate=0.3)
    with pytest.raises(ConfigError, match="mean/std"):
        build_model("resnet18", 10, (0.5,), (0.5,))
    model = build_model("wrn28_10", 10, MEAN, STD, width=TINY, drop_rate=0.3)
    assert model.block1.layer[0].drop_rate == 0.3


# Architecture options of the schemas, each at its default (what a config without the key builds).
SCHEMA_OPTIONS = {
    "resnet18": {"stem": "conv3x3"},
    "preact_resnet18": {"shortcut_input": "preact"},
    **{name: {"stats": "dataset", "bn_momentum": 0.1} for name in DM_NAMES},
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_conf_files(compose, name: str) -> None:
    # The group file only selects the architecture; its defaults come from the schema, once.
    raw = yaml.safe_load((CONF_DIR / f"{name}.yaml").read_text())
    assert raw == {"defaults": [f"/schema/model/{name}@_here_", "_self_"], "name": name}
    cfg = OmegaConf.to_container(compose([f"model={name}", "logger=none"]).model)
    schema = MODELS.get(name).schema
    options = SCHEMA_OPTIONS.get(name, {})
    assert {k: v for k, v in cfg.items() if k not in ("drop_rate",)} == {
        "name": name,
        "width": 1.0,
        "normalize": "meanstd",
        "init_from": None,
        **options,
    }
    assert cfg == {"name": name, **{k: f.default for k, f in schema.model_fields.items() if k != "name"}}
    cfg["width"] = TINY
    assert build_model(num_classes=10, mean=MEAN, std=STD, **cfg).arch == name


# ----------------------------------------------------------------------------- checkpoints


def test_filter_state_dict_loads_trades_checkpoint() -> None:
    model = tiny("wrn34_10")
    source = tiny("wrn34_10", seed=3)
    official = dict(source.state_dict())
    official.update({f"sub_block1.{k}": v.clone() for k, v in source.block1.state_dict().items()})
    wrapped = {f"module.{k}": v for k, v in official.items()}  # DataParallel prefix
    with pytest.raises(RuntimeError, match="sub_block1"):
        model.load_state_dict(official)
    for raw in (official, wrapped, {"state_dict": wrapped}):
        filtered = filter_state_dict(raw)
        check_state_dict_compatible(model, filtered, "trades.pt")
        model.load_state_dict(filtered)
    with torch.no_grad():
        assert torch.equal(model(images()), source(images()))


def test_check_state_dict_compatible() -> None:
    model = tiny("preact_resnet18")
    check_state_dict_compatible(model, model.state_dict(), "self.pt")
    with pytest.raises(CheckpointError) as info:
        check_state_dict_compatible(model, tiny("resnet18").state_dict(), "resnet.pt")
    message = str(info.value)
    assert message.startswith("resnet.pt:") and "preact_resnet18" in message
    assert "missing keys: bn.weight" in message and "unexpected keys: bn1.weight" in message
    with pytest.raises(CheckpointError, match=r"shape mismatch: fc\.weight \(checkpoint \(100, 64\)"):
        check_state_dict_compatible(model, tiny("preact_resnet18", num_classes=100).state_dict(), "c100.pt")


# ----------------------------------------------------------------------------- architecture options


def _block_by_hand(block: nn.Module, x: torch.Tensor, shortcut_reads_raw: bool) -> torch.Tensor:
    """A PreAct block written out: BN-ReLU-conv-BN-ReLU-conv plus the 1x1 shortcut of x or relu(bn1(x))."""
    a = F.relu(block.bn1(x))
    out = block.conv2(F.relu(block.bn2(block.conv1(a))))
    if block.shortcut is None:
        return out + x
    return out + block.shortcut[0](x if shortcut_reads_raw else a)


def _prn18(shortcut_input: str | None = None, seed: int = 0) -> RobustModel:
    torch.manual_seed(seed)
    kwargs = {} if shortcut_input is None else {"shortcut_input": shortcut_input}
    return build_model("preact_resnet18", 10, MEAN, STD, width=TINY, **kwargs)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_preact_shortcut_input_raw_matches_a_hand_written_block(mode: str) -> None:
    default, raw = _prn18(), _prn18("raw", seed=5)
    # Same parameters and keys: the option changes the forward only, and checkpoints load either way.
    assert list(raw.state_dict()) == list(default.state_dict())
    raw.load_state_dict(default.state_dict())
    default.train(mode == "train")
    raw.train(mode == "train")
    projection = [n for n in default.block_layers if default.get_submodule(n).shortcut is not None]
    assert projection == ["layer2.0", "layer3.0", "layer4.0"]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in default.block_layers:
            b_def, b_raw = default.get_submodule(name), raw.get_submodule(name)
            x = torch.randn(2, b_def.bn1.num_features, 8, 8, generator=g)
            out_def, out_raw = b_def(x), b_raw(x)
            # Bit-exact: the default is today's block (shortcut of the pre-activated input).
            assert torch.equal(out_def, _block_by_hand(b_def, x, shortcut_reads_raw=False)), name
            assert torch.equal(out_raw, _block_by_hand(b_raw, x, shortcut_reads_raw=True)), name
            if name in projection:
                assert not torch.allclose(out_raw, out_def), name
            else:
                assert torch.equal(out_raw, out_def), name  # identity shortcuts always add x itself
        x = images()
        assert not torch.allclose(raw(x), default(x))


def test_preact_shortcut_input_default_is_preact_and_bad_values_are_refused() -> None:
    default, explicit = _prn18(), _prn18("preact")
    assert default.shortcut_input == "preact" and default.layer2[0].shortcut_input == "preact"
    x = images()
    with torch.no_grad():
        assert torch.equal(default.eval()(x), explicit.eval()(x))
    assert "shortcut_input=raw" in repr(_prn18("raw").layer2[0])
    with pytest.raises(
        ConfigError, match=r"model\.shortcut_input='post' is not allowed; choose one of: preact, raw"
    ):
        _prn18("post")
    with pytest.raises(ConfigError, match=r"model\.shortcut_input is not an option of model 'resnet18'"):
        build_model("resnet18", 10, MEAN, STD, width=TINY, shortcut_input="raw")


def test_resnet18_conv7x7_stem_full_width_layer4_taps_are_2048_dim() -> None:
    # A real full-width forward on two 32x32 images (well under a second on a CPU core).
    torch.manual_seed(0)
    sat_stem = build_model("resnet18", 10, MEAN, STD, stem="conv7x7_s2").eval()
    taps = ["layer4.0", "layer4.1"]
    with torch.no_grad():
        logits, feats = forward_with_features(sat_stem, images(), [*sat_stem.feature_layers, *taps])
    assert logits.shape == (2, 10)
    assert [tuple(feats[n].shape[1:]) for n in sat_stem.feature_layers] == [
        (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)
    ]  # fmt: skip
    assert [feats[n].flatten(1).shape[1] for n in taps] == [512 * 2 * 2] * 2 == [2048] * 2
    # The default CIFAR stem keeps 32x32 through layer1: 512 * 4 * 4 = 8192-d taps (shapes only).
    default = on_meta("resnet18")
    with torch.device("meta"):
        x = torch.empty(2, 3, 32, 32)
    _, meta_feats = forward_with_features(default, x, taps)
    assert [meta_feats[n].flatten(1).shape[1] for n in taps] == [8192] * 2
    # 7x7 instead of 3x3 stem kernel: 3 * 64 * (49 - 9) more parameters, nothing else.
    assert count_parameters(on_meta("resnet18")) + 3 * 64 * 40 == count_parameters(sat_stem) == 11_181_642


def test_resnet18_conv7x7_stem_matches_a_hand_written_stem() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, MEAN, STD, width=TINY, stem="conv7x7_s2").eval()
    seen: dict[str, torch.Tensor] = {}
    model.layer1.register_forward_hook(lambda _m, inputs, _out: seen.__setitem__("in", inputs[0]))
    x = images()
    with torch.no_grad():
        model(x)
        # torchvision's stem (conv 7x7 stride 2 padding 3, BN, ReLU) with no max-pool after it.
        by_hand = F.relu(model.bn1(F.conv2d(model.normalize(x), model.conv1.weight, stride=2, padding=3)))
    assert seen["in"].shape == (2, 8, 16, 16)
    assert torch.equal(seen["in"], by_hand)


def test_resnet18_stem_default_unchanged_checkpoints_refused_across_stems_and_bad_values() -> None:
    torch.manual_seed(0)
    default = build_model("resnet18", 10, MEAN, STD, width=TINY).eval()
    torch.manual_seed(0)
    explicit = build_model("resnet18", 10, MEAN, STD, width=TINY, stem="conv3x3").eval()
    assert (
        default.stem == "conv3x3" and default.conv1.kernel_size == (3, 3) and default.conv1.stride == (1, 1)
    )
    with torch.no_grad():
        assert torch.equal(default(images()), explicit(images()))
    sat_stem = build_model("resnet18", 10, MEAN, STD, width=TINY, stem="conv7x7_s2")
    assert list(sat_stem.state_dict()) == list(default.state_dict())
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch: conv1\.weight \(checkpoint \(8, 3, 3, 3\), model \(8, 3, 7, 7\)",
    ):
        check_state_dict_compatible(sat_stem, default.state_dict(), "cifar_stem.pt")
    with pytest.raises(
        ConfigError, match=r"model\.stem='imagenet' is not allowed; choose one of: conv3x3, conv7x7_s2"
    ):
        build_model("resnet18", 10, MEAN, STD, stem="imagenet")
    with pytest.raises(ConfigError, match=r"model\.stem is not an option of model 'preact_resnet18'"):
        build_model("preact_resnet18", 10, MEAN, STD, stem="conv7x7_s2")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=resnet18", "model.stem=bogus"], "model.stem='bogus' is not allowed"),
        (["model.shortcut_input=post"], "model.shortcut_input='post' is not allowed"),
        (["model=wrn28_10", "+model.stem=conv7x7_s2"], "model.stem is not an option of model 'wrn28_10'"),
    ],
)
def test_run_config_validation_refuses_bad_architecture_options(compose, overrides, message) -> None:
    # config.py checks these keys by building the model: the builders raise ConfigError naming the key.
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_train_config(compose([*overrides, "logger=none"]))
