"""Throughput of robust-train's training step beside a reference loop written like the papers' code.

Modes (`--mode`, several allowed):

- `step` (default): images/s of one training step for any model, defense and add-ons on synthetic
  CIFAR-shaped data (3x32x32, 10 classes), ours and, in the same process on the same images, a reference
  loop written the way the papers' code is written: fp32, NCHW, a torch DataLoader over PIL images with
  torchvision RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor, a `.item()` per step, and for PGD-AT
  (Rice et al. / AWP code) `loss.backward()` in the attack with the model's parameters requiring grad,
  then `model.zero_grad()`; for TRADES the TRADES repo's loop (KL inner loss against a clean forward that
  is recomputed at every attack step, x + 0.001 * N(0, I) start, three outer forwards). Repetitions of ours
  and the reference alternate and the medians are compared, so a machine shared with other jobs slows
  both alike. Prints both, their ratio, peak memory, and achieved FLOP/s as a fraction of the device's
  peak. Only PGD-AT and TRADES have a reference loop; other defenses and add-ons print ours alone.
- `epoch`: seconds per training epoch of the full runner (`Trainer.train_epoch`) on `--images` synthetic
  images, extrapolated linearly to 50,000 when fewer are used (labelled).
- `data`: extra-data streaming (`dataset.extra`). Writes, once, an uncompressed .npz of
  `--extra-images` synthetic CIFAR images in the DM-Improves-AT format (streaming, never one array in
  memory; `--extra-path`, default the temp folder; free disk is checked first), evicts it from the page
  cache, then measures the images/s that the trainer's pipeline delivers in batches of `--data-batch`
  at `--extra-fraction` (memory-mapped gather of sorted rows, HWC -> CHW, pin, copy to the training
  device, by the background reader; the original images are gathered on the device), first from a cold
  page cache, then warm, with the peak RSS (VmHWM) while streaming. It also counts the FLOPs of one
  training step of `--flop-model` (TRADES, `--flop-attack-steps` attack steps) and converts them at an
  assumed sustained GPU throughput (`--gpu-tflops` x `--mfu`, printed) into the images/s a GPU consumes:
  margin = delivered / consumed. The file is deleted at the end unless `--keep`.
- `autoattack`: seconds per 1,000 images of AutoAttack lite and standard (the official code through the
  adapter) on `--aa-images` images, scaled to 1,000 (labelled). Labels are the model's own predictions
  and eps is `--aa-eps` (default 1e-4), so no image is broken and every attack of the standard version
  runs on every image: the upper bound of AutoAttack's cost for this model (on a robust model the later
  attacks run only on the still-robust fraction).

Examples:

    python scripts/bench.py                                     # make bench: PRN-18 width 0.25 (16 base
                                                                # channels), batch 128, PGD-AT and TRADES
    python scripts/bench.py --defense trades --addons slim --override trainer.fast.amp=true
    python scripts/bench.py --mode epoch autoattack --model wrn34_10 --width 1 --json bench.json
    nice python scripts/bench.py --mode data --extra-images 2000000 --threads 1 --device cpu

Memory: CUDA reports `torch.cuda.max_memory_allocated` (tensors only); the CPU reports the process's
peak resident set size (VmHWM, reset through /proc/self/clear_refs before each measurement), which
includes the Python process, libraries and the dataset.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import resource
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from robust_train.addons import build_addons
from robust_train.attacks import AutoAttack, ThreatModel
from robust_train.builders import (
    fast_path_from_config,
    model_from_config,
    optimizer_from_config,
    threat_from_config,
)
from robust_train.cli import CONFIG_DIR
from robust_train.config import resolve_device, resolve_step, to_float
from robust_train.data import augment_batch, batch_indices, build_dataset
from robust_train.data import to_float as u8_to_float
from robust_train.defenses import build_defense
from robust_train.training.fastpath import FastPath
from robust_train.training.step import TrainStep

CIFAR_TRAIN = 50_000
REFERENCE_DEFENSES = ("pgd_at", "trades")
# Dense peak TFLOP/s by device-name fragment: (bf16, fp32 without tensor cores). Vendors' data sheets.
GPU_PEAK_TFLOPS = {
    "H200": (989.4, 66.9),
    "H100 PCIe": (756.0, 51.2),
    "H100": (989.4, 66.9),
    "A100": (312.0, 19.5),
    "L40S": (362.1, 91.6),
    "A10G": (70.0, 31.2),
    "L4": (121.0, 30.3),
    "RTX 4090": (165.2, 82.6),
}


# ----------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS.
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) / 1024 if match else float("nan")
    except OSError:
        return float("nan")


def memory_kind(device: torch.device) -> str:
    return "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS (VmHWM)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, bf16: bool, override: float | None) -> tuple[float | None, str]:
    """The device's dense peak for the step's compute dtype, and where the figure comes from."""
    if override:
        return override, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (p_bf16, p_fp32) in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return (p_bf16 if bf16 else p_fp32), f"data sheet ({fragment}, {'bf16' if bf16 else 'fp32'})"
        return None, "unknown GPU: pass --peak-tflops"
    # CPU estimate: threads x clock x FLOP/cycle of the widest FMA units the flags advertise.
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, "no /proc/cpuinfo: pass --peak-tflops"
    mhz = re.search(r"cpu MHz\s*:\s*([\d.]+)", info)
    flag_line = re.search(r"flags\s*:(.*)", info)
    flags = set(flag_line.group(1).split()) if flag_line else set()
    amd = "AuthenticAMD" in info
    # Two FMA pipes: AVX-512 gives 64 fp32 FLOP/cycle on Intel; AMD Zen 4 runs AVX-512 on 256-bit pipes (32).
    per_cycle = 64 if ("avx512f" in flags and not amd) else 32 if ("avx2" in flags and "fma" in flags) else 8
    if bf16 and "avx512_bf16" in flags:
        per_cycle *= 2
    if not mhz:
        return None, "unknown clock: pass --peak-tflops"
    tf = torch.get_num_threads() * float(mhz.group(1)) * 1e6 * per_cycle / 1e12
    threads, clock = torch.get_num_threads(), float(mhz.group(1))
    return tf, f"estimate: {threads} threads x {clock:.0f} MHz x {per_cycle} FLOP/cycle"


# ----------------------------------------------------------------------------- config and builders
def compose_cfg(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def base_overrides(args: argparse.Namespace, defense: str, train_size: int) -> list[str]:
    addons = f"addons=[{','.join(args.addons)}]" if args.addons else "addons=[]"
    return [
        "dataset=synthetic",
        f"dataset.train_size={train_size + 8}",  # + the validation split carved from it
        "dataset.val_size=8",
        "dataset.test_size=" + str(max(8, args.aa_images)),
        f"model={args.model}",
        f"model.width={args.width}",
        f"defense={defense}",
        addons,
        "logger=none",
        f"trainer.batch_size={args.batch}",
        "trainer.progress=false",
        f"device={args.device}",
        *args.override,
    ]


@dataclass
class Built:
    cfg: DictConfig
    device: torch.device
    data: Any
    model: nn.Module
    defense: Any
    addons: list
    threat: ThreatModel
    fast: FastPath
    optimizer: torch.optim.Optimizer
    ref_model: nn.Module = field(default=None)  # type: ignore[assignment]


def build(args: argparse.Namespace, defense_name: str, train_size: int) -> Built:
    cfg = compose_cfg(base_overrides(args, defense_name, train_size))
    device = resolve_device(cfg.get("device"))
    torch.manual_seed(int(cfg.seed))
    data = build_dataset(cfg.dataset, int(cfg.seed)).to(device)
    model = model_from_config(cfg.model, data).to(device)
    ref_model = copy.deepcopy(model)  # same initial weights, plain fp32 NCHW eager
    threat = threat_from_config(cfg.threat)
    defense = build_defense(cfg.defense, threat)
    ctx = {"model": model, "defense": defense, "threat": threat, "num_classes": data.num_classes, "seed": 0}
    addons = build_addons(cfg, ctx)
    fast = fast_path_from_config(cfg.trainer.get("fast"), device)
    fast.prepare_model(model)
    optimizer = optimizer_from_config(cfg.trainer.optimizer, model, device, fused=fast.fused_sgd)
    # Late epoch: every warm-up over, every scheduled strength on (the steady-state cost).
    epoch = int(cfg.trainer.epochs) - 1
    defense.on_epoch_start(epoch)
    for addon in addons:
        addon.on_epoch_start(epoch)
    return Built(cfg, device, data, model, defense, addons, threat, fast, optimizer, ref_model)


# ----------------------------------------------------------------------------- ours
def our_batches(b: Built, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches as the trainer makes them: device-resident uint8 data, batched crop + flip there."""
    ds = b.cfg.dataset
    gen = torch.Generator(device=b.device).manual_seed(1)
    while True:
        for idx in batch_indices(b.data.train_x.shape[0], batch, True, gen, drop_last=True):
            x = augment_batch(
                b.data.train_x[idx], pad=int(ds.crop_pad), flip=bool(ds.flip),
                padding_mode=str(ds.padding_mode), generator=gen,
            )  # fmt: skip
            yield x, b.data.train_y[idx]


def make_ours(b: Built, batch: int) -> Callable[[], None]:
    step = TrainStep(b.model, b.defense, b.optimizer, b.addons, b.fast)
    batches = our_batches(b, batch)

    def run() -> None:
        x, y = next(batches)
        step(x, y)  # returns device tensors; nothing is read back

    return run


# ----------------------------------------------------------------------------- the reference loop
class PILDataset(Dataset):
    """CIFAR-10-style dataset: uint8 HWC arrays returned as PIL images through torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def reference_loader(b: Built, batch: int, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    images = b.data.train_x.cpu().permute(0, 2, 3, 1).contiguous().numpy()
    labels = b.data.train_y.cpu().numpy()
    tf = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
    )
    loader = DataLoader(
        PILDataset(images, labels, tf), batch_size=batch, shuffle=True, num_workers=workers,
        pin_memory=b.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
    )  # fmt: skip
    while True:
        yield from loader


def make_reference(b: Built, batch: int, workers: int) -> Callable[[], None] | None:
    """One step of the papers' loop for the defense, or None when there is no reference for it."""
    name = b.cfg.defense.name
    if name not in REFERENCE_DEFENSES:
        return None
    model, device = b.ref_model, b.device
    opt_cfg = b.cfg.trainer.optimizer
    opt = torch.optim.SGD(
        model.parameters(), lr=to_float(opt_cfg.lr, "lr"), momentum=to_float(opt_cfg.momentum, "m"),
        weight_decay=to_float(opt_cfg.weight_decay, "wd"),
    )  # fmt: skip
    attack = b.cfg.defense.attack
    eps, steps = b.threat.eps, int(attack.steps)
    alpha = resolve_step(attack.step, eps, "defense.attack.step")
    beta = to_float(b.cfg.defense.get("beta", 6.0), "beta")
    loader = reference_loader(b, batch, workers)
    totals = {"loss": 0.0, "acc": 0.0, "n": 0}

    def pgd_at() -> None:
        # Rice et al. / AWP train_cifar.py: attack in train mode, loss.backward() into delta.grad.
        x, y = next(loader)
        x, y = x.to(device), y.to(device)
        model.train()
        delta = torch.zeros_like(x).uniform_(-eps, eps)
        delta = torch.max(torch.min(delta, 1 - x), -x)
        delta.requires_grad = True
        for _ in range(steps):
            loss = F.cross_entropy(model(x + delta), y)
            loss.backward()
            grad = delta.grad.detach()
            d = torch.clamp(delta + alpha * torch.sign(grad), -eps, eps)
            delta.data = torch.max(torch.min(d, 1 - x), -x)
            delta.grad.zero_()
        model.zero_grad()
        delta = delta.detach()
        output = model(torch.clamp(x + delta, 0, 1))
        loss = F.cross_entropy(output, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals["loss"] += loss.item() * y.size(0)
        totals["acc"] += (output.max(1)[1] == y).sum().item()
        totals["n"] += y.size(0)

    def trades() -> None:
        # The TRADES repo's trades_loss: eval-mode attack on KL(sum) against a recomputed clean forward.
        x, y = next(loader)
        x, y = x.to(device), y.to(device)
        kl = nn.KLDivLoss(reduction="sum")
        model.eval()
        x_adv = x.detach() + 0.001 * torch.randn(x.shape, device=device).detach()
        for _ in range(steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_kl = kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        model.train()
        x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
        opt.zero_grad()
        logits = model(x)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / x.shape[0]) * kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
        loss = loss_natural + beta * loss_robust
        loss.backward()
        opt.step()
        totals["loss"] += loss.item() * y.size(0)
        totals["n"] += y.size(0)

    return pgd_at if name == "pgd_at" else trades


# ----------------------------------------------------------------------------- measurements
def count_flops(fn: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def peak_of(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    reset_peak(device)
    fn()
    sync(device)
    return peak_mem_mb(device)


def timed(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return time.perf_counter() - start


def bench_step(args: argparse.Namespace, defense: str) -> dict[str, Any]:
    train_size = args.batch * max(8, args.steps + 2)
    b = build(args, defense, train_size)
    ours = make_ours(b, args.batch)
    ref = None if args.no_reference else make_reference(b, args.batch, args.ref_workers)
    # Warm-up (cudnn autotuning, compile, loader start-up, allocator growth); the first warm-up step of
    # each side also gives its peak memory (later steps allocate no more).
    peak_ours = peak_of(ours, b.device)
    peak_ref = peak_of(ref, b.device) if ref is not None else None
    for _ in range(args.warmup - 1):
        ours()
        if ref is not None:
            ref()
    ours_s: list[float] = []
    ref_s: list[float] = []
    for rep in range(args.reps):
        # Alternate which side goes first, so a drift in machine load favours neither.
        order = [("ours", ours), ("ref", ref)] if rep % 2 == 0 else [("ref", ref), ("ours", ours)]
        for side, fn in order:
            if fn is None:
                continue
            seconds = timed(fn, args.steps, b.device)
            (ours_s if side == "ours" else ref_s).append(seconds / args.steps)
    ours_img_s = args.batch / statistics.median(ours_s)
    ref_img_s = args.batch / statistics.median(ref_s) if ref_s else None

    # FLOPs of our step, counted on an eager fp32 copy (the count does not depend on dtype or compile).
    flop_b = copy.copy(b)
    flop_b.model = copy.deepcopy(b.ref_model)
    flop_b.optimizer = torch.optim.SGD(flop_b.model.parameters(), lr=0.0)
    flop_b.fast = FastPath(device_type=b.device.type)
    flop_b.defense = build_defense(b.cfg.defense, b.threat)
    flop_b.defense.on_epoch_start(int(b.cfg.trainer.epochs) - 1)
    if b.addons:
        ctx = {"model": flop_b.model, "defense": flop_b.defense, "threat": b.threat,
               "num_classes": b.data.num_classes, "seed": 0}  # fmt: skip
        flop_b.addons = build_addons(b.cfg, ctx)
        for addon in flop_b.addons:
            addon.on_epoch_start(int(b.cfg.trainer.epochs) - 1)
    # FLOPs are linear in the batch size: count a small batch and scale (saves a full step on the CPU).
    flop_batch = min(args.batch, 8)
    flops = count_flops(make_ours(flop_b, flop_batch)) * args.batch / flop_batch
    peak, peak_src = peak_tflops(b.device, b.fast.amp, args.peak_tflops)
    achieved = flops * ours_img_s / args.batch / 1e12
    return {
        "defense": defense,
        "addons": list(args.addons),
        "model": args.model,
        "width": args.width,
        "batch": args.batch,
        "fast": b.fast.describe(),
        "ours_img_s": ours_img_s,
        "reference_img_s": ref_img_s,
        "ratio": ours_img_s / ref_img_s if ref_img_s else None,
        "ours_s_per_step": [round(s, 4) for s in ours_s],
        "reference_s_per_step": [round(s, 4) for s in ref_s],
        "peak_mem_mb": peak_ours,
        "reference_peak_mem_mb": peak_ref,
        "gflop_per_step": flops / 1e9,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_tflops_source": peak_src,
        "fraction_of_peak": achieved / peak if peak else None,
    }


def bench_epoch(args: argparse.Namespace, defense: str) -> dict[str, Any]:
    from robust_train.training.trainer import Trainer

    n = args.images
    b = build(args, defense, n)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            b.cfg, Path(tmp), b.data, b.model, b.defense, b.optimizer, b.threat, addons=b.addons
        )
        # The trainer builds its own step from trainer.fast, exactly as a real run does.
        warm = our_batches(b, args.batch)
        for _ in range(args.warmup):  # one-time costs (cudnn autotuning, compile) are not per-epoch costs
            trainer.step(*next(warm))
        sync(b.device)
        start = time.perf_counter()
        trainer.train_epoch(int(b.cfg.trainer.epochs) - 1)
        sync(b.device)
        seconds = time.perf_counter() - start
    return {
        "defense": defense,
        "addons": list(args.addons),
        "images": n,
        "epoch_s": seconds,
        "epoch_s_50k": seconds * CIFAR_TRAIN / n,
        "extrapolated": n != CIFAR_TRAIN,
        "fast": b.fast.describe(),
    }


def _rss_mb(field: str) -> float:
    match = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def _write_extra_file(path: Path, n: int, seed: int = 0) -> float:
    """A synthetic DM-Improves-AT .npz of n CIFAR images, streamed in chunks; returns the seconds taken."""
    from robust_train.data.extra import NpzWriter

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    chunk = 65_536
    with NpzWriter(path, n, (32, 32, 3)) as out:
        for at in range(0, n, chunk):
            k = min(chunk, n - at)
            out.write(rng.integers(0, 256, size=(k, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, size=k))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return time.perf_counter() - start


def _evict(path: Path) -> None:
    """Drop the file's pages from the kernel's page cache (clean pages; no root needed), for a cold read."""
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_data(args: argparse.Namespace) -> dict[str, Any]:
    from robust_train.data.extra import ExtraSource, npz_members

    n, batch, fraction, steps = args.extra_images, args.data_batch, args.extra_fraction, args.data_steps
    path = args.extra_path or Path(tempfile.gettempdir()) / f"robust_train_bench_extra_{n}.npz"
    path = Path(path)
    need = n * (32 * 32 * 3 + 8) + (1 << 20)
    reuse = False
    if path.exists():
        try:
            reuse = npz_members(path)["image"].shape == (n, 32, 32, 3)
        except Exception:
            reuse = False
    write_s = None
    if not reuse:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
        if free < need + (1 << 30):
            raise SystemExit(
                f"bench --mode data: {path.parent} has {free / 2**30:.1f} GiB free; the file needs "
                f"{need / 2**30:.1f} GiB (+1 GiB spare). Pass --extra-path on a larger disk or fewer "
                "--extra-images"
            )
        write_s = _write_extra_file(path, n)
    size = path.stat().st_size
    how = f", written in {write_s:.1f} s" if write_s is not None else " (reused)"
    print(f"extra file: {path}, {n:,} images, {size / 2**30:.2f} GiB{how}", flush=True)
    _evict(path)

    device = resolve_device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    n_train = CIFAR_TRAIN
    train_x = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator())
    train_x, train_y = train_x.to(device), torch.randint(0, 10, (n_train,)).to(device)
    source = ExtraSource([path], seed=0)
    plan = source.plan(0, n_train, batch, fraction, steps, gen)
    extra_per_step = sum(len(e) for e in plan.extra) / steps

    def deliver() -> float:
        feed = source.feed(plan.extra, device)
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            more_x, more_y = feed.next()
            x = torch.cat([train_x[plan.orig[i]], more_x])
            y = torch.cat([train_y[plan.orig[i]], more_y])
            assert x.shape[0] == y.shape[0] == batch
        sync(device)
        seconds = time.perf_counter() - start
        feed.close()
        return seconds

    reset_peak(torch.device("cpu"))
    rss_before = _rss_mb("VmRSS")
    cold_s = deliver()  # the rows come from disk
    warm_s = deliver()  # the same rows again, now in the page cache
    peak_rss = _rss_mb("VmHWM")
    anon_now, file_now = _rss_mb("RssAnon"), _rss_mb("RssFile")
    source.close()
    cold, warm = batch * steps / cold_s, batch * steps / warm_s

    # FLOPs of one training step of the recipe's model, counted at batch 1 on the CPU (linear in batch).
    flop_args = copy.copy(args)
    flop_args.model, flop_args.width, flop_args.addons = args.flop_model, args.flop_width, []
    flop_args.device, flop_args.aa_images = "cpu", 8
    flop_args.override = [f"defense.attack.steps={args.flop_attack_steps}"]
    b = build(flop_args, "trades", 1)
    flop_per_image = count_flops(make_ours(b, 1))
    sustained = args.gpu_tflops * args.mfu
    consumed = sustained * 1e12 / flop_per_image
    assumption = (
        f"{args.gpu_tflops:g} TFLOP/s dense peak (default: H100 SXM bf16 data sheet) x {args.mfu:.0%} MFU "
        f"= {sustained:.1f} TFLOP/s sustained"
    )
    kept = args.keep or (reuse and args.extra_path is not None)
    if not kept:
        path.unlink()
    result = {
        "extra_images": n,
        "file": str(path),
        "file_bytes": size,
        "file_kept": kept,
        "write_s": write_s,
        "batch": batch,
        "extra_fraction": fraction,
        "extra_per_batch": extra_per_step,
        "steps": steps,
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "delivered_img_s_cold": cold,
        "delivered_img_s_warm": warm,
        "delivered_img_s": cold,
        "peak_rss_mb": peak_rss,
        "rss_before_mb": rss_before,
        "rss_anon_mb": anon_now,
        "rss_file_mb": file_now,
        "max_rss_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "flop_model": f"{args.flop_model} width {args.flop_width}, TRADES, "
        f"{args.flop_attack_steps} attack steps",
        "gflop_per_image": flop_per_image / 1e9,
        "gflop_per_step": flop_per_image * batch / 1e9,
        "gpu_assumption": assumption,
        "gpu_consumed_img_s": consumed,
        "margin": cold / consumed,
    }
    return result


def print_data(r: dict[str, Any]) -> None:
    print(
        f"delivered ({r['device']}, batch {r['batch']}, {r['extra_per_batch']:.0f} extra + "
        f"{r['batch'] - r['extra_per_batch']:.0f} original per batch, {r['steps']} steps): "
        f"{r['delivered_img_s_cold']:,.0f} img/s from a cold page cache, "
        f"{r['delivered_img_s_warm']:,.0f} warm",
        flush=True,
    )
    print(
        f"peak RSS while streaming: {r['peak_rss_mb']:.0f} MB (RSS before {r['rss_before_mb']:.0f} MB; "
        f"file {r['file_bytes'] / 2**20:,.0f} MB)",
        flush=True,
    )
    print(f"GPU step: {r['flop_model']}: {r['gflop_per_image']:.1f} GFLOP per image "
          f"({r['gflop_per_step'] / 1000:.1f} TFLOP per batch of {r['batch']})", flush=True)  # fmt: skip
    print(f"assumed GPU: {r['gpu_assumption']} -> consumes {r['gpu_consumed_img_s']:,.0f} img/s", flush=True)
    print(f"margin (delivered cold / consumed): {r['margin']:.1f}x"
          + ("" if r["file_kept"] else "; extra file deleted (--keep keeps it)"), flush=True)  # fmt: skip


def bench_autoattack(args: argparse.Namespace) -> dict[str, Any]:
    b = build(args, "pgd_at", args.batch)
    model = b.model
    model.eval()
    x = u8_to_float(b.data.test_x[: args.aa_images])
    with torch.no_grad():
        y = model(x).argmax(1)  # every image starts correctly classified
    threat = ThreatModel(b.threat.norm, args.aa_eps)
    out: dict[str, Any] = {"images": int(x.shape[0]), "eps": args.aa_eps}
    for version in args.aa_versions:
        attack = AutoAttack(threat, version=version, batch_size=args.aa_batch)
        sync(b.device)
        start = time.perf_counter()
        attack(model, x, y)
        sync(b.device)
        seconds = time.perf_counter() - start
        out[f"{version}_s"] = seconds
        out[f"{version}_s_per_1000"] = seconds * 1000 / x.shape[0]
        out[f"{version}_robust_acc"] = attack.report.get("robust_accuracy_after")
    out["scaled"] = x.shape[0] != 1000
    return out


# ----------------------------------------------------------------------------- output
def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def print_step_table(rows: list[dict[str, Any]], device: torch.device) -> None:
    print(f"\nTraining step, img/s (median of alternating repetitions); memory: {memory_kind(device)}")
    head = (
        f"{'defense':<16} {'ours img/s':>10} {'ref img/s':>10} {'ratio':>6} {'ours MB':>8} {'ref MB':>8} "
        f"{'GFLOP/step':>10} {'TFLOP/s':>8} {'of peak':>8}"
    )
    print(head)
    for r in rows:
        label = r["defense"] + "".join(f"+{a}" for a in r["addons"])
        frac = r["fraction_of_peak"]
        print(
            f"{label:<16} {r['ours_img_s']:>10.1f} {fmt(r['reference_img_s'], '>10.1f')} "
            f"{fmt(r['ratio'], '>6.2f')} {r['peak_mem_mb']:>8.0f} {fmt(r['reference_peak_mem_mb'], '>8.0f')} "
            f"{r['gflop_per_step']:>10.1f} {r['achieved_tflops']:>8.3f} "
            f"{'-' if frac is None else f'{100 * frac:.1f}%':>8}",
            flush=True,
        )
    if rows:
        print(f"peak TFLOP/s: {fmt(rows[0]['peak_tflops'], '.2f')} ({rows[0]['peak_tflops_source']})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    fmt_cls = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(description=__doc__, formatter_class=fmt_cls)
    p.add_argument("--mode", nargs="+", default=["step"], choices=["step", "epoch", "autoattack", "data"])
    p.add_argument("--model", default="preact_resnet18")
    p.add_argument("--width", type=float, default=0.25, help="0.25 = 16 base channels for PreActResNet-18")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--defense", nargs="+", default=["pgd_at", "trades"])
    p.add_argument("--addons", nargs="*", default=[])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per repetition")
    p.add_argument("--reps", type=int, default=3, help="alternating repetitions (medians are compared)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side (>= 1)")
    p.add_argument(
        "--ref-workers",
        type=int,
        default=None,
        help="reference DataLoader workers (default: 2 on CUDA as in the papers' code, 0 on CPU)",
    )
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--images", type=int, default=CIFAR_TRAIN, help="epoch mode: images per epoch")
    p.add_argument("--aa-images", type=int, default=1000)
    p.add_argument("--aa-batch", type=int, default=500)
    p.add_argument("--aa-eps", type=float, default=1e-4)
    p.add_argument("--aa-versions", nargs="+", default=["lite", "standard"], choices=["lite", "standard"])
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's peak, for the FLOP/s fraction"
    )
    p.add_argument(
        "--override", nargs="*", default=[], help="more Hydra overrides, e.g. trainer.fast.amp=true"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    data = p.add_argument_group("data mode (extra-data streaming)")
    data.add_argument("--extra-images", type=int, default=2_000_000, help="images in the synthetic .npz")
    data.add_argument("--extra-path", type=Path, default=None, help="where to write it (default: /tmp)")
    data.add_argument("--keep", action="store_true", help="keep the .npz (a later run reuses it)")
    data.add_argument("--data-batch", type=int, default=512, help="training batch (the DM-AT recipe's 512)")
    data.add_argument("--extra-fraction", type=float, default=0.7, help="share of each batch from the file")
    data.add_argument("--data-steps", type=int, default=400, help="batches timed per pass (cold, then warm)")
    data.add_argument("--flop-model", default="wrn28_10", help="the model whose step the GPU runs")
    data.add_argument("--flop-width", type=float, default=1.0)
    data.add_argument("--flop-attack-steps", type=int, default=10)
    data.add_argument("--gpu-tflops", type=float, default=989.4, help="dense peak (H100 SXM bf16: 989.4)")
    data.add_argument("--mfu", type=float, default=0.4, help="sustained fraction of the peak")
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step of each side measures its peak memory)")
    warnings.filterwarnings("ignore", message=".*TF32.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.ref_workers is None:
        args.ref_workers = 2 if device.type == "cuda" else 0
    name = device_name(device)
    print(
        f"device: {name}; torch {torch.__version__}; {args.model} width {args.width}, batch {args.batch}",
        flush=True,
    )
    result: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "model": args.model,
        "width": args.width,
        "batch": args.batch,
        "memory": memory_kind(device),
    }
    if "step" in args.mode:
        rows = [bench_step(args, d) for d in args.defense]
        print_step_table(rows, device)
        result["step"] = rows
        first = rows[0]
        for key in ("ours_img_s", "reference_img_s", "ratio", "peak_mem_mb"):
            result[key] = first[key]
        result["defense"] = first["defense"]
    if "epoch" in args.mode:
        result["epoch"] = []
        for d in args.defense:
            r = bench_epoch(args, d)
            label = " (extrapolated from {} images)".format(r["images"]) if r["extrapolated"] else ""
            print(f"epoch {d}: {r['epoch_s']:.1f} s for {r['images']} images -> "
                  f"{r['epoch_s_50k']:.1f} s per 50,000-image epoch{label}", flush=True)  # fmt: skip
            result["epoch"].append(r)
    if "data" in args.mode:
        result["data"] = bench_data(args)
        print_data(result["data"])
    if "autoattack" in args.mode:
        r = bench_autoattack(args)
        scaled = f" (scaled from {r['images']} images)" if r["scaled"] else ""
        per = ", ".join(f"{v} {r[f'{v}_s_per_1000']:.1f} s / 1000 img" for v in args.aa_versions)
        print(f"AutoAttack (eps {r['eps']:g}, every image robust: upper bound){scaled}: {per}", flush=True)
        result["autoattack"] = r
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"json: {args.json}")
    return result


if __name__ == "__main__":
    main()
