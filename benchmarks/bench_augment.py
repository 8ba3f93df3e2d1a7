"""Two-view SimCLR augmentation throughput: fastclr's torch pipeline and DALI pipeline vs
torchvision transforms in a DataLoader (what users run today).

    python -m benchmarks.bench_augment                    # CPU, 32x32 and 224x224
    python -m benchmarks.bench_augment --device cuda

Images are random uint8 arrays (32x32 sources for the 32x32 output, 256x256 for 224x224).
fastclr torch: batches of uint8 tensors already in memory (on the device) through
TorchSimCLRAugment. fastclr DALI: dali_loader over the in-memory array (external_source; CPU
mode on the CPU, 2 threads). torchvision: the usual SimCLR transform (RandomResizedCrop, flip,
ColorJitter with p 0.8, grayscale, blur at 224) applied per image twice, in a DataLoader with
--workers worker processes. Each figure is the median of --repeats timed passes over --images
images after a warm-up pass. Results go to benchmarks/results/augment-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks import common


class _TwoViews(torch.utils.data.Dataset):
    def __init__(self, data: np.ndarray, transform):
        self.data, self.transform = data, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        from PIL import Image
        img = Image.fromarray(self.data[i])
        return self.transform(img), self.transform(img)


def torchvision_transform(size: int):
    from torchvision import transforms as T
    s = 0.5 if size < 96 else 1.0
    ops = [T.RandomResizedCrop(size), T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
           T.RandomGrayscale(p=0.2)]
    if size >= 96:
        k = int(round(0.1 * size)) // 2 * 2 + 1
        ops.append(T.RandomApply([T.GaussianBlur(k, (0.1, 2.0))], p=0.5))
    ops += [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    return T.Compose(ops)


def bench_torchvision(data, size, batch, workers, repeats):
    loader = torch.utils.data.DataLoader(_TwoViews(data, torchvision_transform(size)),
                                         batch_size=batch, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        count = 0
        for v1, _ in loader:
            count += v1.shape[0]
        if r:
            times.append(count / (time.perf_counter() - t0))
    return statistics.median(times)


def bench_fastclr(data, size, batch, device, repeats):
    from fastclr.app.augment import TorchSimCLRAugment
    aug = TorchSimCLRAugment(size, strength=0.5 if size < 96 else 1.0)
    x = torch.from_numpy(data).to(device)
    times = []
    for r in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(x) - batch + 1, batch):
            aug(x[i:i + batch])
        if device == "cuda":
            torch.cuda.synchronize()
        if r:
            times.append((len(x) // batch) * batch / (time.perf_counter() - t0))
    return statistics.median(times)


def bench_dali(data, size, batch, device, repeats):
    from fastclr.app.dali import dali_loader
    loader = dali_loader(data, batch, size, device="gpu" if device == "cuda" else "cpu",
                         strength=0.5 if size < 96 else 1.0, num_threads=2)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        count = sum(v1.shape[0] for v1, _, _ in loader)
        if device == "cuda":
            torch.cuda.synchronize()
        if r:
            times.append(count / (time.perf_counter() - t0))
    return statistics.median(times)


def table(rows: list) -> str:
    lines = ["| output | pipeline | two-view images/s | vs torchvision |", "|---:|---|---:|---:|"]
    for size in dict.fromkeys(r["size"] for r in rows):
        group = [r for r in rows if r["size"] == size]
        tv = next((r["images_per_s"] for r in group if r["pipeline"].startswith("torchvision")), None)
        for r in group:
            ratio = f"{r['images_per_s'] / tv:.2f}x" if tv else ""
            lines.append(f"| {size}x{size} | {r['pipeline']} ({r['device']}) | {r['images_per_s']:.0f} "
                         f"| {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--images", type=int, help="images per pass (default: 8192 at 32, 512 at 224)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    common.add_output_args(p)
    args = p.parse_args(argv)
    rows = []
    for size in args.sizes:
        src = 32 if size <= 32 else 256
        n = args.images or (8192 if size <= 32 else (4096 if args.device == "cuda" else 512))
        data = np.random.default_rng(0).integers(0, 256, (n, src, src, 3), dtype=np.uint8)
        batch = min(args.batch, n)
        rows.append({"size": size, "pipeline": "fastclr torch", "device": args.device,
                     "images_per_s": bench_fastclr(data, size, batch, args.device, args.repeats)})
        from fastclr.app.dali import dali_available
        if dali_available():
            rows.append({"size": size, "pipeline": "fastclr DALI", "device": args.device,
                         "images_per_s": bench_dali(data, size, batch, args.device, args.repeats)})
        else:
            print("nvidia-dali not installed: no DALI row")
        rows.append({"size": size, "pipeline": f"torchvision DataLoader ({args.workers} workers)",
                     "device": "cpu", "images_per_s": bench_torchvision(data, size, batch, args.workers,
                                                                         args.repeats)})
    meta = {"machine": common.machine(args.device),
            "versions": common.versions("torch", "torchvision", "fastclr", "nvidia-dali-cuda130")}
    common.publish("augment", "benchmarks.bench_augment",
                   f"Two-view SimCLR augmentation, {common.where(meta)}", table(rows), rows, meta, args, argv)


if __name__ == "__main__":
    main()
