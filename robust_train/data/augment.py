"""Batched, device-side augmentation (random crop + horizontal flip) and batching helpers.

Everything here works on whole batches with index arithmetic: no Python loop over images and no
host round trip, so it runs on the GPU next to the uint8 dataset.
"""

from __future__ import annotations

import torch

from robust_train.errors import ConfigError

PADDING_MODES = ("zero", "reflect")


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (x / 255)."""
    return x.to(torch.float32).div_(255)


def _randint(high: int, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Draw where the generator lives (a CPU generator cannot feed a CUDA draw), then move.
    gen_device = generator.device if generator is not None else device
    out = torch.randint(0, high, (n,), generator=generator, device=gen_device)
    return out.to(device)


def _source_index(
    pos: torch.Tensor, size: int, padding_mode: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map positions in the padded frame (shifted back by pad, so may be <0 or >=size) to source indices.

    Returns the clamped index and, for zero padding, the mask of positions inside the image.
    """
    if padding_mode == "reflect":
        # Reflection without repeating the edge pixel, as torch.nn.functional.pad(mode="reflect").
        pos = pos.abs()
        pos = torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)
        return pos, None
    inside = (pos >= 0) & (pos < size)
    return pos.clamp(0, size - 1), inside


def augment_batch(
    x: torch.Tensor,
    pad: int = 4,
    flip: bool = True,
    padding_mode: str = "zero",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop (from the image padded by `pad`) and random horizontal flip, per image, batched.

    x: uint8 (N, C, H, W) on any device. Returns float32 in [0, 1] of the same shape. Each image gets
    crop offsets (dy, dx) uniform in [0, 2*pad] of the padded image and is mirrored with p=0.5.
    Random numbers come from `generator` in this order: dy, dx, flip. `pad=0, flip=False` returns
    exactly `x / 255`.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch expects NCHW images, got shape {tuple(x.shape)}")
    if padding_mode not in PADDING_MODES:
        raise ConfigError(
            f"dataset.padding_mode={padding_mode!r} is not a known padding mode; "
            f"allowed: {', '.join(PADDING_MODES)}"
        )
    pad = int(pad)
    if pad < 0:
        raise ConfigError(f"dataset.crop_pad={pad} must be >= 0")
    n, c, h, w = x.shape
    if padding_mode == "reflect" and pad >= min(h, w):
        raise ConfigError(f"dataset.crop_pad={pad} is too large for reflect padding of {h}x{w} images")
    if (pad == 0 and not flip) or n == 0:
        return to_float(x)

    device = x.device
    if pad > 0:
        dy = _randint(2 * pad + 1, n, generator, device)
        dx = _randint(2 * pad + 1, n, generator, device)
    else:
        dy = dx = torch.zeros(n, dtype=torch.int64, device=device)
    # Row r of the output reads row dy + r of the padded image, i.e. row dy + r - pad of x.
    rows = dy[:, None] - pad + torch.arange(h, device=device)  # (N, H)
    cols = dx[:, None] - pad + torch.arange(w, device=device)  # (N, W)
    if flip:
        mirror = _randint(2, n, generator, device).bool()
        cols = torch.where(mirror[:, None], cols.flip(1), cols)

    rows, row_in = _source_index(rows, h, padding_mode)
    cols, col_in = _source_index(cols, w, padding_mode)
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    # Gather in uint8 (a quarter of the bytes of float) and convert once at the end.
    out = x.reshape(n, c, h * w).gather(2, flat)
    if row_in is not None and col_in is not None:  # zero padding: both masks or neither
        outside = ~(row_in[:, :, None] & col_in[:, None, :]).reshape(n, 1, h * w)
        out = out.masked_fill(outside, 0)
    return to_float(out.reshape(n, c, h, w))


def batch_indices(
    n: int,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """Split range(n) (shuffled with `generator` if asked) into index tensors of `batch_size`.

    The tensors live on the generator's device (CPU without one), so indexing a device-resident
    dataset needs no host transfer.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    device = generator.device if generator is not None else torch.device("cpu")
    if shuffle:
        order = torch.randperm(n, generator=generator, device=device)
    else:
        order = torch.arange(n, device=device)
    batches = list(order.split(batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
