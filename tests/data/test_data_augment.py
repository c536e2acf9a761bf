"""augment_batch, to_float and batch_indices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robust_train.data import augment_batch, batch_indices, to_float
from robust_train.errors import ConfigError


def _images(n: int = 16, c: int = 3, h: int = 10, w: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


def _matches_some_window(
    out: torch.Tensor, img: torch.Tensor, pad: int, mode: str
) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) for which `out` is that window of the padded `img` (per-image reference)."""
    fimg = img[None].to(torch.float32) / 255
    padded = F.pad(fimg, (pad,) * 4, mode="constant" if mode == "zero" else "reflect")[0]
    h, w = img.shape[1:]
    hits = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            window = padded[:, dy : dy + h, dx : dx + w]
            for flipped in (False, True):
                ref = window.flip(-1) if flipped else window
                if torch.equal(out, ref):
                    hits.append((dy, dx, flipped))
    return hits


def test_to_float_is_x_over_255():
    x = _images()
    y = to_float(x)
    assert y.dtype == torch.float32 and torch.equal(y, x.float() / 255)


def test_identity_without_pad_and_flip():
    x = _images()
    assert torch.equal(augment_batch(x, pad=0, flip=False), x.to(torch.float32) / 255)


def test_shape_dtype_range():
    x = _images(n=32)
    y = augment_batch(x, pad=4, flip=True, generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == torch.float32 and y.is_contiguous()
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # Zero padding shows up as exact zeros in some crops.
    assert (y == 0).any()


def test_flip_only_mirrors_and_does_both():
    x = _images(n=64)
    y = augment_batch(x, pad=0, flip=True, generator=torch.Generator().manual_seed(0))
    base = to_float(x)
    same = (y == base).flatten(1).all(1)
    mirrored = (y == base.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert same.any() and mirrored.any()


@pytest.mark.parametrize("mode", ["zero", "reflect"])
def test_crop_is_a_window_of_the_padded_image(mode):
    x = _images(n=24, h=9, w=11)
    pad = 3
    y = augment_batch(x, pad=pad, flip=True, padding_mode=mode, generator=torch.Generator().manual_seed(5))
    offsets = set()
    for i in range(len(x)):
        hits = _matches_some_window(y[i], x[i], pad, mode)
        assert hits, f"image {i} is not a (flipped) window of its padded original"
        offsets.add(hits[0][:2])
    assert len(offsets) > 3  # offsets really vary per image


def test_offsets_cover_the_full_range():
    # Each corner has its own value; corner (r0, c0) lands at (r0 + pad - dy, c0 + pad - dx), and
    # whatever the offsets, at least one corner stays inside the crop.
    pad, n, h, w = 2, 400, 6, 6
    corners = {255: (0, 0), 200: (0, w - 1), 150: (h - 1, 0), 100: (h - 1, w - 1)}
    x = torch.zeros(n, 1, h, w, dtype=torch.uint8)
    for value, (r0, c0) in corners.items():
        x[:, :, r0, c0] = value
    y = (augment_batch(x, pad=pad, flip=False, generator=torch.Generator().manual_seed(0)) * 255).round()
    offsets = set()
    for img in y[:, 0]:
        value = next(v for v in corners if (img == v).any())
        r, c = (img == value).nonzero()[0].tolist()
        offsets.add((corners[value][0] + pad - r, corners[value][1] + pad - c))
    full = set(range(2 * pad + 1))
    assert offsets == {(dy, dx) for dy in full for dx in full}


def test_reproducible_under_a_generator():
    x = _images(n=20)
    a = augment_batch(x, generator=torch.Generator().manual_seed(42))
    b = augment_batch(x, generator=torch.Generator().manual_seed(42))
    c = augment_batch(x, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_reflect_differs_from_zero_padding_at_the_border():
    x = torch.full((50, 3, 8, 8), 200, dtype=torch.uint8)
    zero = augment_batch(x, pad=4, padding_mode="zero", generator=torch.Generator().manual_seed(0))
    refl = augment_batch(x, pad=4, padding_mode="reflect", generator=torch.Generator().manual_seed(0))
    assert (zero == 0).any()
    assert torch.equal(refl, torch.full_like(refl, 200 / 255))


def test_bad_arguments():
    x = _images()
    with pytest.raises(ConfigError, match="padding_mode"):
        augment_batch(x, padding_mode="circular")
    with pytest.raises(ConfigError, match="crop_pad"):
        augment_batch(x, pad=10, padding_mode="reflect")
    with pytest.raises(ValueError, match="NCHW"):
        augment_batch(x[0])


def test_empty_batch():
    x = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    assert augment_batch(x).shape == (0, 3, 8, 8)


@pytest.mark.parametrize(
    ("n", "bs", "drop_last"), [(10, 3, False), (10, 3, True), (9, 3, True), (5, 8, False)]
)
@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_indices_cover_everything_once(n, bs, drop_last, shuffle):
    batches = batch_indices(n, bs, shuffle, generator=torch.Generator().manual_seed(0), drop_last=drop_last)
    sizes = [len(b) for b in batches]
    assert all(s == bs for s in sizes[:-1])
    flat = torch.cat(batches).tolist() if batches else []
    assert len(flat) == len(set(flat))
    if drop_last:
        assert sizes == [bs] * (n // bs)
    else:
        assert sorted(flat) == list(range(n))
    if not shuffle:
        assert flat == list(range(len(flat)))
    assert all(b.dtype == torch.int64 and b.device.type == "cpu" for b in batches)


def test_batch_indices_shuffle_is_seeded():
    a = batch_indices(100, 10, True, torch.Generator().manual_seed(1))
    b = batch_indices(100, 10, True, torch.Generator().manual_seed(1))
    c = batch_indices(100, 10, True, torch.Generator().manual_seed(2))
    assert torch.equal(torch.cat(a), torch.cat(b)) and not torch.equal(torch.cat(a), torch.cat(c))
    assert not torch.equal(torch.cat(a), torch.arange(100))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_cuda_matches_reference():
    x = _images(n=8).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    y = augment_batch(x, pad=4, flip=True, generator=g)
    assert y.device.type == "cuda"
    for i in range(len(x)):
        assert _matches_some_window(y[i].cpu(), x[i].cpu(), 4, "zero")
    idx = batch_indices(10, 4, True, generator=torch.Generator(device="cuda").manual_seed(0))
    assert all(b.device.type == "cuda" for b in idx)
