"""End-to-end SimCLR training throughput, one component swapped at a time.

    python -m benchmarks.bench_train                   # CPU: 32 px, ResNet-18/50, batch 64 and 256
    python -m benchmarks.bench_train --device cuda     # GPU: 224 px, bf16, batch 256 and 1024

A training step is what ``python -m fastclr.train`` does: two augmented views of a batch of
synthetic uint8 images, one forward of both views through a torchvision ResNet + projection head,
NT-Xent, backward, LARS. The baseline uses fastclr everywhere (fused loss, fastclr LARS, DALI
augmentation on a GPU / the torch augmentation on a CPU); each other row swaps ONE component for
what users run today, so each component's contribution shows:

- loss: naive PyTorch NT-Xent (the 2N x 2N matrix), lightly's NTXentLoss;
- optimizer: lightly's LARS;
- augmentation: the torch augmentation (on the device) / DALI, and torchvision transforms in a
  DataLoader with --workers processes.

A last row, the bare encoder, is the floor: forward+backward of the same model on two fixed
views (no augmentation, no contrastive loss, no optimizer step); "step / bare encoder" is each
step's time over it, i.e. what the rest of the step costs on top of the encoder.

Images/s counts images (each seen as two views), median over --steps timed steps after a warm-up
step (the DataLoader's workers are started before timing). A configuration that runs out of
memory is recorded as such. Results: benchmarks/results/train-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks import common

BASELINE = {"loss": "fused", "optimizer": "fastclr", "augment": None}  # augment: by device
SWAPS = [("loss", "naive"), ("loss", "lightly"), ("optimizer", "lightly"), ("augment", "other"),
         ("augment", "torchvision")]
# The floor: the encoder's forward+backward alone, on views made once (no augmentation, a sum
# of squares for a loss, no optimizer step). A step's time over this one is what fastclr adds.
BARE = {"loss": "none", "optimizer": "none", "augment": "none", "swap": "bare"}


def _loss(name, temperature=0.2):
    import fastclr
    if name == "fused":
        return lambda a, b: fastclr.nt_xent_fused(a, b, temperature)
    from benchmarks.bench_loss import make_loss
    return make_loss(name, temperature, "cpu")


def _optimizer(name, model, lr):
    import fastclr
    if name == "fastclr":
        return fastclr.LARS(fastclr.lars_param_groups(model, 1e-6), lr=lr, momentum=0.9)
    from lightly.utils.lars import LARS as LightlyLARS
    return LightlyLARS(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-6)


def _views(name, data, batch, size, device, dtype, channels_last, workers):
    """An endless iterator of (view1, view2) on the device."""
    if name == "none":  # the bare encoder: the same two random views every step
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        v = torch.randn(2, batch, 3, size, size, device=device).to(dtype, memory_format=fmt)
        while True:
            yield v[0], v[1]
    elif name == "torch":
        from fastclr.app.augment import TorchSimCLRAugment
        aug = TorchSimCLRAugment(size, strength=0.5 if size < 96 else 1.0, dtype=dtype,
                                 channels_last=channels_last)
        x = torch.from_numpy(data).to(device)
        while True:
            for i in range(0, len(x) - batch + 1, batch):
                yield aug(x[i:i + batch])
    elif name == "dali":
        from fastclr.app.dali import dali_loader
        loader = dali_loader(data, batch, size, device="gpu" if device.type == "cuda" else "cpu",
                             strength=0.5 if size < 96 else 1.0, dtype=dtype,
                             channels_last=channels_last, num_threads=max(2, workers))
        while True:
            for v1, v2, _ in loader:
                yield v1, v2
    else:
        from benchmarks.bench_augment import _TwoViews, torchvision_transform
        loader = torch.utils.data.DataLoader(_TwoViews(data, torchvision_transform(size)),
                                             batch_size=batch, num_workers=workers, drop_last=True,
                                             persistent_workers=workers > 0,
                                             pin_memory=device.type == "cuda")
        while True:
            for v1, v2 in loader:
                v1 = v1.to(device, dtype, non_blocking=True)
                v2 = v2.to(device, dtype, non_blocking=True)
                if channels_last:
                    v1 = v1.contiguous(memory_format=torch.channels_last)
                    v2 = v2.contiguous(memory_format=torch.channels_last)
                yield v1, v2


def run_config(arch, batch, size, device, cfg, steps, workers, src) -> dict:
    from fastclr.app import models
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    channels_last = gpu
    row = {"model": arch, "batch": batch, "size": size, **cfg, "device": device.type}
    torch.manual_seed(0)
    try:
        model = models.build_model(arch, cifar_stem=False).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        bare = cfg["loss"] == "none"
        opt = None if bare else _optimizer(cfg["optimizer"], model, 0.3 * batch / 256)
        loss_fn = (lambda a, b: a.square().mean() + b.square().mean()) if bare else _loss(cfg["loss"])
        n = max(2 * batch, 512 if gpu else batch)
        data = np.random.default_rng(0).integers(0, 256, (n, src, src, 3), dtype=np.uint8)
        views = _views(cfg["augment"], data, batch, size, device, dtype, channels_last, workers)
        times = []
        for i in range(steps + 1):
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            v1, v2 = next(views)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                _, z = model(torch.cat([v1, v2]))
            z1, z2 = z.float().chunk(2)
            loss = loss_fn(z1, z2)
            model.zero_grad(set_to_none=True)
            loss.backward()
            if opt is not None:
                opt.step()
            if gpu:
                torch.cuda.synchronize()
            if i:  # the first step warms up (allocations, autotuning, workers)
                times.append(time.perf_counter() - t0)
        row.update(status="ok", step_s=statistics.median(times), times_s=times,
                   images_per_s=batch / statistics.median(times))
    except ImportError as exc:
        row.update(status="missing", error=str(exc)[:200])
    except (RuntimeError, MemoryError) as exc:
        row.update(status="oom" if "memory" in str(exc).lower() else "error",
                   error=str(exc).splitlines()[0][:300])
    finally:
        if gpu:
            torch.cuda.empty_cache()
    return row


def table(rows: list) -> str:
    """One line per configuration: images/s, its ratio to all-fastclr's, and (when the rows hold
    the bare encoder) its step time over the bare encoder's forward+backward."""
    ok = [r for r in rows if r.get("status") == "ok"]
    base = {(r["model"], r["batch"]): r["images_per_s"] for r in ok if r.get("swap") is None}
    bare = {(r["model"], r["batch"]): r["step_s"] for r in ok if r.get("swap") == "bare"}
    head = "| model | batch | loss | optimizer | augmentation | images/s | vs all-fastclr |"
    rule = "|---|---:|---|---|---|---:|---:|"
    if bare:
        head, rule = head + " step / bare encoder |", rule + "---:|"
    lines = [head, rule]
    for r in rows:
        key = (r["model"], r["batch"])
        val, ratio, over = r.get("status"), "", ""
        if r.get("status") == "ok":
            val = f"{r['images_per_s']:.0f}"
            ratio = f"{r['images_per_s'] / base[key]:.2f}x" if key in base else ""
            over = f"{r['step_s'] / bare[key]:.2f}x" if key in bare else ""
        mark = lambda k: f"**{r[k]}**" if r.get("swap") == k else r[k]  # noqa: E731
        parts = ("bare encoder (fwd+bwd only)", "", "") if r.get("swap") == "bare" else \
            (mark("loss"), mark("optimizer"), mark("augment"))
        lines.append(f"| {r['model']} | {r['batch']} | {' | '.join(parts)} | {val} | {ratio} |"
                     + (f" {over} |" if bare else ""))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--batches", type=int, nargs="+", help="default: 64 256 on CPU, 256 1024 on GPU")
    p.add_argument("--image-size", type=int, help="default: 32 on CPU, 224 on GPU")
    p.add_argument("--steps", type=int, help="timed steps per configuration (default: 3 CPU, 10 GPU)")
    p.add_argument("--workers", type=int, default=2, help="torchvision DataLoader processes")
    p.add_argument("--swaps", nargs="*", help="which swaps, as component=choice (default: all)")
    p.add_argument("--no-bare", action="store_true", help="leave out the bare-encoder row")
    common.add_output_args(p)
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    device = torch.device(args.device)
    batches = args.batches or ([256, 1024] if gpu else [64, 256])
    size = args.image_size or (224 if gpu else 32)
    src = 32 if size <= 32 else 256
    steps = args.steps or (10 if gpu else 3)
    from fastclr.app.dali import dali_available
    base_aug = "dali" if gpu and dali_available() else "torch"
    other_aug = "torch" if base_aug == "dali" else ("dali" if dali_available() else None)
    swaps = [(k, other_aug if v == "other" else v) for k, v in SWAPS]
    swaps = [(k, v) for k, v in swaps if v is not None]
    if args.swaps is not None:
        swaps = [tuple(s.split("=", 1)) for s in args.swaps]
    from tqdm import tqdm
    configs = []
    for arch in args.models:
        for b in batches:
            cfg = dict(BASELINE, augment=base_aug)
            configs.append((arch, b, {**cfg, "swap": None}))
            if not args.no_bare:
                configs.append((arch, b, dict(BARE)))
            for k, v in swaps:
                configs.append((arch, b, {**cfg, k: v, "swap": k}))
    rows = [run_config(arch, b, size, device, cfg, steps, args.workers, src)
            for arch, b, cfg in tqdm(configs, desc="bench_train", unit="config")]
    meta = {"machine": common.machine(args.device),
            "versions": common.versions("torch", "torchvision", "fastclr", "lightly", "nvidia-dali-cuda130"),
            "image_size": size, "steps": steps}
    common.publish("train", "benchmarks.bench_train",
                   f"SimCLR training step, synthetic {size}x{size} images, {common.where(meta)}, "
                   f"{'bf16' if gpu else 'float32'}", table(rows), rows, meta, args, argv)


if __name__ == "__main__":
    main()
