"""The mechanics of LAD (docs/methods/lad.md#sites): sites, the recording tap, the perturbation hooks, site
noise.

Everything here works with forward hooks on the model's residual blocks (named by `block_layers`), so no
architecture is modified. The add-on class in `robust_train.addons.lad` decides when each piece runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from robust_train.errors import ConfigError
from robust_train.models.features import resolve_layer

SCHEMES = ("lt", "sm")
NOISE_SCALE_MODES = ("absolute", "relative")
# Which block inputs the recording tap keeps: none, the first site's (a_0, for the ratio), or all (LAD-SM).
TAP_INPUTS = ("none", "first", "all")


def residual_block_names(model: nn.Module) -> list[str]:
    """The model's residual-block names in forward order (`block_layers`), or ConfigError when it has none."""
    base = getattr(model, "_orig_mod", model)
    names = list(getattr(base, "block_layers", []) or [])
    if not names:
        arch = getattr(base, "arch", type(base).__name__)
        raise ConfigError(
            f"addons.lad.sites=residual_blocks but model '{arch}' declares no block_layers; "
            "choose a model with residual blocks or list the sites by layer name"
        )
    return names


def site_modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The submodules named by `names` (ConfigError naming an unknown layer and the known ones)."""
    return [resolve_layer(model, name) for name in names]


@dataclass
class Adjoints:
    """Detached dL/dh of one recording pass at every site: `out[n]` at its output, `inp[n]` at its input.

    In docs/methods/lad.md#recording-pass a_{n+1} = out[n] and a_n = inp[n] (for consecutive blocks inp[n+1]
    is out[n]).
    `inp` entries are None where the tap did not keep that input. `first_output` is the recorded state
    after the first site (the numerator of the docs/methods/lad.md#eta-ratio).
    """

    out: list[Tensor]
    inp: list[Tensor | None]
    first_output: Tensor | None = None


class StateTap:
    """Keeps each site's output (and input) tensor of one forward, in the graph, for `autograd.grad`.

    Register it around the forward with `with tap:`; tensors are only referenced, never modified, so the
    forward is unchanged. Hooks registered after other hooks (e.g. site noise) see the state those made.
    """

    def __init__(self, modules: Sequence[nn.Module], inputs: str = "none") -> None:
        if inputs not in TAP_INPUTS:
            raise ValueError(f"inputs={inputs!r}; allowed: {', '.join(TAP_INPUTS)}")
        self.modules = list(modules)
        self.inputs = inputs
        self.out: list[Tensor | None] = [None] * len(self.modules)
        self.inp: list[Tensor | None] = [None] * len(self.modules)
        self._handles: list[Any] = []

    def __enter__(self) -> StateTap:
        for i, module in enumerate(self.modules):
            if self.inputs == "all" or (self.inputs == "first" and i == 0):
                self._handles.append(module.register_forward_pre_hook(self._keep_input(i)))
            self._handles.append(module.register_forward_hook(self._keep_output(i)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _keep_input(self, i: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            self.inp[i] = args[0]

        return hook

    def _keep_output(self, i: int) -> Any:
        def hook(_module: nn.Module, _args: Any, output: Tensor) -> None:
            self.out[i] = output

        return hook

    @property
    def filled(self) -> bool:
        return all(t is not None for t in self.out)

    def adjoints(self, loss: Tensor, retain_graph: bool = False) -> Adjoints:
        """dL/dstate at every kept state, detached; activation gradients only (no parameter .grad)."""
        if not self.filled:
            raise RuntimeError("the LAD recording tap saw no forward through every site")
        wanted = [t for t in self.out if t is not None] + [t for t in self.inp if t is not None]
        # A block's input is the previous block's output tensor: ask autograd for each tensor once.
        unique: dict[int, Tensor] = {}
        for t in wanted:
            unique.setdefault(id(t), t)
        grads = torch.autograd.grad(loss, list(unique.values()), retain_graph=retain_graph)
        by_id = {key: g.detach() for key, g in zip(unique, grads)}
        out = [by_id[id(t)] for t in self.out]
        inp = [None if t is None else by_id[id(t)] for t in self.inp]
        first = self.out[0]
        assert first is not None  # `filled`
        return Adjoints(out=out, inp=inp, first_output=first.detach())


@contextmanager
def perturbation_hooks(
    modules: Sequence[nn.Module], adj: Adjoints, eta: float, scheme: str
) -> Iterator[None]:
    """Install the LAD (lt) or LAD-SM (sm) additions on the residual stream; removed on exit.

    lt: x_{n+1} = B_n(x_n) + eta * a_{n+1}.
    sm: x~_n = x_n + (eta/2) a_n before the block, x_{n+1} = B_n(x~_n) + (eta/4)(a_n + a_{n+1}) after it
        ((eta/2) a_{n+1} after a down-sampling block, whose a_n has another shape).
    The adjoints are constants (detached), so no second-order term reaches the parameters.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"addons.lad.scheme={scheme!r} is not allowed; choose one of: {', '.join(SCHEMES)}")
    if scheme == "sm" and any(a is None for a in adj.inp):
        raise RuntimeError("LAD-SM needs the adjoint at every block input; record with inputs='all'")
    handles = []

    def post(n: int) -> Any:
        a_in, a_out = adj.inp[n], adj.out[n]
        if scheme == "lt":
            delta = eta * a_out
        elif a_in is not None and a_in.shape == a_out.shape:
            delta = (0.25 * eta) * (a_in + a_out)
        else:
            # Down-sampling block: a_n lives in the input space, so the mid-point adjoint falls back to
            # a_{n+1}, the only one in the output space (same half-step size eta/2) [ours].
            delta = (0.5 * eta) * a_out

        def hook(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
            return output + delta

        return hook

    def pre(n: int) -> Any:
        a_in = adj.inp[n]
        assert a_in is not None  # checked above for the sm scheme, the only one with pre-steps
        delta = (0.5 * eta) * a_in

        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (args[0] + delta, *args[1:])

        return hook

    try:
        for n, module in enumerate(modules):
            if scheme == "sm":
                handles.append(module.register_forward_pre_hook(pre(n)))
            handles.append(module.register_forward_hook(post(n)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[None]:
    """Restore every BatchNorm running statistic (and batch counter) bit-exactly on exit."""
    saved = []
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            for buf in (m.running_mean, m.running_var, m.num_batches_tracked):
                if buf is not None:
                    saved.append((buf, buf.detach().clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class SiteNoise:
    """Gaussian noise added at every site in a forward (the stochastic variant, docs/methods/lad.md#noise).

    Draws come from the add-on's own generator (one per device), never from the global one, so switching
    the noise on does not shift data order or attack starts.
    """

    def __init__(self, std: float, scale_mode: str, seed: int) -> None:
        if scale_mode not in NOISE_SCALE_MODES:
            raise ConfigError(
                f"addons.lad.noise.scale_mode={scale_mode!r} is not allowed; "
                f"choose one of: {', '.join(NOISE_SCALE_MODES)}"
            )
        self.std = float(std)
        self.scale_mode = scale_mode
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._pending_state: torch.Tensor | None = None

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            if self._pending_state is not None:
                g.set_state(self._pending_state)
                self._pending_state = None
            self._generators[key] = g
        return self._generators[key]

    def sample(self, output: Tensor) -> Tensor:
        """One noise draw shaped like `output` (its std scaled by std(output) in relative mode)."""
        z = torch.randn(
            output.shape, generator=self.generator(output.device), device=output.device, dtype=output.dtype
        )
        scale = self.std
        if self.scale_mode == "relative":
            # Noise is a random perturbation, not a learnable path: its scale carries no gradient.
            return z * (scale * output.detach().std())
        return z * scale

    @contextmanager
    def hooks(self, modules: Sequence[nn.Module]) -> Iterator[None]:
        """Add fresh noise to every site's output in every forward inside the block."""

        def hook(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
            return output + self.sample(output)

        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def state_dict(self) -> dict[str, Any]:
        """The state of the generator in use (the single training device), for exact resumption."""
        if self._generators:
            return {"generator": next(iter(self._generators.values())).get_state()}
        return {"generator": self._pending_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        g_state = state.get("generator")
        if g_state is None:
            return
        g_state = g_state.to("cpu")
        if self._generators:
            next(iter(self._generators.values())).set_state(g_state)
        else:
            self._pending_state = g_state


class NoisyEnsemble(nn.Module):
    """The stochastic model at evaluation time: mean logits of several noisy forwards.

    Predictions (no input gradient requested) average `samples` draws; a forward that an attack
    differentiates w.r.t. its input averages `grad_samples` draws (1: one noise draw per attack step,
    docs/methods/lad.md#noise; more approximates an expectation-over-transformation attack on the logits).
    """

    def __init__(
        self, model: nn.Module, site_names: Sequence[str], noise: SiteNoise, samples: int, grad_samples: int
    ) -> None:
        super().__init__()
        self.model = model
        self.site_names = list(site_names)
        self.noise = noise
        self.samples = int(samples)
        self.grad_samples = int(grad_samples)

    def forward(self, x: Tensor) -> Tensor:
        n = self.grad_samples if (torch.is_grad_enabled() and x.requires_grad) else self.samples
        with self.noise.hooks(site_modules(self.model, self.site_names)):
            total = self.model(x)
            for _ in range(n - 1):
                total = total + self.model(x)
        return total / n
