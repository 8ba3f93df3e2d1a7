"""A folder of photos into two augmented SimCLR views: images/s of three pipelines, side by side.

    python -m benchmarks.bench_folder                     # 500x375 JPEGs, views of 32 and 224 px

- fastclr (--dataset folder): each image decoded in a DataLoader worker, its two random resized
  crops taken from the decoded original and resized there (PIL), the rest of the augmentation
  (flip, colour jitter, grayscale, blur) batched (TorchSimCLRAugment without its crop);
- fastclr 0.1.0's folder path: each image resized to a (size x 256/224) square in the workers,
  then the whole augmentation batched, crop included (a crop of the squashed image);
- torchvision: the usual per-image SimCLR transform (RandomResizedCrop, flip, ColorJitter p 0.8,
  grayscale, blur from 96 px) applied twice per image in the DataLoader's workers.

Every pipeline reads the same --images JPEGs (written once to a temporary folder) with --workers
processes and batches of --batch; each figure is the median of --repeats timed passes after a
warm-up pass. Results go to benchmarks/results/folder-cpu-<date>.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks import common
from benchmarks.bench_augment import torchvision_transform


def write_photos(root: str, n: int, width: int = 500, height: int = 375) -> None:
    """``n`` JPEGs with photo-like content (smooth gradients and texture), in one class folder."""
    from PIL import Image
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "photos"), exist_ok=True)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n):
        base = np.stack([(xx * rng.uniform(0.2, 0.6) + yy * rng.uniform(0.1, 0.5) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(root, "photos", f"{i:05d}.jpg"), quality=90)


def _rate(passes, repeats: int) -> float:
    """Median images/s of ``passes()`` (an iterator of batch sizes) over timed passes."""
    rates = []
    for r in range(repeats + 1):
        t0, count = time.perf_counter(), 0
        for b in passes(r):
            count += b
        if r:
            rates.append(count / (time.perf_counter() - t0))
    return statistics.median(rates)


def bench_fastclr(root, size, batch, workers, repeats):
    from fastclr.app import folder
    from fastclr.app.augment import TorchSimCLRAugment
    ds = folder.load(root, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    batches = folder.FileBatches(ds, size, batch, workers=workers, scale=(0.08, 1.0))
    aug = TorchSimCLRAugment(size, strength=0.5 if size < 96 else 1.0, crop=False)
    gen = torch.Generator().manual_seed(0)

    def passes(epoch):
        for views, _ in batches.epoch(epoch):
            aug(views.flatten(0, 1), generator=gen, views=1)
            yield views.shape[1]
    return _rate(passes, repeats)


def bench_squash(root, size, batch, workers, repeats):
    """0.1.0's folder path, as it was: each image resized to a square in the workers, then the
    whole augmentation batched, its crop taken from the squashed square."""
    import torchvision
    from torchvision.transforms import v2 as T

    from fastclr.app.augment import TorchSimCLRAugment
    side = int(round(size * 256 / 224))
    ds = torchvision.datasets.ImageFolder(root, transform=T.Compose([T.Resize((side, side), antialias=True),
                                                                     T.PILToTensor()]))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    aug = TorchSimCLRAugment(size, strength=0.5 if size < 96 else 1.0)
    gen = torch.Generator().manual_seed(0)

    def passes(_):
        for x, _ in loader:
            aug(x, generator=gen, views=2)
            yield x.shape[0]
    return _rate(passes, repeats)


def bench_torchvision(root, size, batch, workers, repeats):
    import torchvision
    ds = torchvision.datasets.ImageFolder(root)
    loader = torch.utils.data.DataLoader(
        _Files(ds, torchvision_transform(size)), batch_size=batch, num_workers=workers, drop_last=True,
        persistent_workers=workers > 0)

    def passes(_):
        for v1, _v2 in loader:
            yield v1.shape[0]
    return _rate(passes, repeats)


class _Files(torch.utils.data.Dataset):
    """Image ``i`` of an ImageFolder, decoded and transformed twice (two views)."""

    def __init__(self, folder, transform):
        self.folder, self.transform = folder, transform

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        img = self.folder[i][0].convert("RGB")
        return self.transform(img), self.transform(img)


def table(rows: list) -> str:
    lines = ["| views | pipeline | two-view images/s | vs torchvision |", "|---:|---|---:|---:|"]
    for size in dict.fromkeys(r["size"] for r in rows):
        group = [r for r in rows if r["size"] == size]
        tv = next(r["images_per_s"] for r in group if r["pipeline"].startswith("torchvision"))
        lines += [f"| {size}x{size} | {r['pipeline']} | {r['images_per_s']:.0f} | "
                  f"{r['images_per_s'] / tv:.2f}x |" for r in group]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_folder", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    common.add_output_args(p)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        write_photos(root, args.images)
        for size in args.sizes:
            for name, bench in (("fastclr: crop the original in the workers", bench_fastclr),
                                ("fastclr 0.1.0: squash to a square, crop batched", bench_squash),
                                (f"torchvision DataLoader ({args.workers} workers)", bench_torchvision)):
                rows.append({"size": size, "pipeline": name, "device": "cpu",
                             "images_per_s": bench(root, size, args.batch, args.workers, args.repeats)})
                print(rows[-1], flush=True)
    meta = {"machine": common.machine("cpu"), "versions": common.versions("torch", "torchvision", "fastclr", "pillow"),
            "images": f"{args.images} JPEGs of 500x375, quality 90"}
    common.publish("folder", "benchmarks.bench_folder",
                   f"A folder of photos into two augmented views, {common.where(meta)}", table(rows), rows, meta,
                   args, argv)


if __name__ == "__main__":
    main()
