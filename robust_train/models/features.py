"""The one helper that captures intermediate outputs of any model with forward hooks."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from robust_train.errors import ConfigError


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the module; layer names refer to the original one.
    return getattr(model, "_orig_mod", model)


def known_layer_names(model: nn.Module) -> list[str]:
    """The model's declared block and stage layer names (top-level children for other modules)."""
    base = _unwrap(model)
    block = list(getattr(base, "block_layers", []))
    stage = list(getattr(base, "feature_layers", []))
    if block or stage:
        return block + stage
    return [name for name, _ in base.named_children()]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """`model.get_submodule(name)`, or ConfigError naming the layer and listing the known ones."""
    base = _unwrap(model)
    module: nn.Module | None = None
    if isinstance(name, str) and name:
        try:
            module = base.get_submodule(name)
        except AttributeError:
            module = None
    if module is None:
        arch = getattr(base, "arch", type(base).__name__)
        raise ConfigError(
            f"feature layer {name!r} is not a submodule of model '{arch}'; "
            f"known layers: {', '.join(known_layer_names(model))}"
        )
    return module


@contextmanager
def capture_features(
    model: nn.Module, names: Sequence[str], detach: bool = False
) -> Iterator[dict[str, Tensor]]:
    """Hook the named submodules; yield a dict name -> output filled by forwards inside the block.

    A later forward overwrites the entries of an earlier one. With `detach=False` the tensors stay
    in the autograd graph (for feature losses); hooks are removed on exit, also on error.
    """
    modules = {name: resolve_layer(model, name) for name in names}
    captured: dict[str, Tensor] = {}

    def make_hook(name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured[name] = output.detach() if (detach and isinstance(output, Tensor)) else output

        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward_with_features(
    model: nn.Module, x: Tensor, names: Sequence[str], detach: bool = False
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass returning (logits, {name: output of that layer})."""
    with capture_features(model, names, detach=detach) as feats:
        logits = model(x)
    return logits, dict(feats)
