"""``python -m fastclr.train``.

The full SimCLR training loop (data, ResNet, LARS, evaluation, checkpoints) lands with its own
issue. Until then this entry point runs a short, real demonstration of the loss: a small MLP
learns to map two noisy views of the same synthetic "image" close together with
``nt_xent_fused``, and prints the loss and the contrastive accuracy as it goes.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm import tqdm

import fastclr
from fastclr import reference


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastclr.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="optimisation steps (default 200)")
    p.add_argument("--batch-size", type=int, default=512, help="images per batch, N (default 512)")
    p.add_argument("--dim", type=int, default=64, help="input dimension (default 64)")
    p.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature (default 0.2)")
    p.add_argument("--impl", default="auto", choices=fastclr.loss.IMPLS, help="loss backend")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "dim"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.temperature > 0:
        p.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def views(prototypes: torch.Tensor, idx: torch.Tensor, gen: torch.Generator):
    """Two augmentations of each prototype: independent noise and feature dropout per sample."""
    x = prototypes[idx]

    def augment():
        keep = (torch.rand(x.shape, generator=gen) > 0.25).to(x.dtype)
        return x * keep + 0.6 * torch.randn(x.shape, generator=gen)

    return augment(), augment()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    prototypes = torch.randn(8192, args.dim, generator=gen)
    model = nn.Sequential(nn.Linear(args.dim, 256), nn.ReLU(), nn.Linear(256, 128))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    backend = fastclr.loss._resolve_impl(args.impl, torch.device("cpu"))
    print(f"fastclr {fastclr.__version__} demo: NT-Xent on two views of synthetic data "
          f"(N={args.batch_size}, M={2 * args.batch_size}, tau={args.temperature}, backend={backend}).\n"
          "The full SimCLR training loop arrives with its own release.")

    # The fused loss and the O(M^2) reference agree on the first batch.
    x1, x2 = views(prototypes, torch.randint(0, len(prototypes), (args.batch_size,), generator=gen), gen)
    with torch.no_grad():
        z1, z2 = model(x1), model(x2)
        fused = fastclr.nt_xent_fused(z1, z2, args.temperature, impl=args.impl)
        ref = reference.nt_xent(z1.double(), z2.double(), args.temperature)
    print(f"first batch: fused loss {fused.item():.6f}, float64 reference {ref.item():.6f}")

    history = []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="demo", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(prototypes), (args.batch_size,), generator=gen)
        x1, x2 = views(prototypes, idx, gen)
        loss, acc = fastclr.nt_xent_fused(model(x1), model(x2), args.temperature, impl=args.impl,
                                          return_accuracy=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append((loss.item(), acc["top1"].item()))
        bar.set_postfix(loss=f"{history[-1][0]:.3f}", top1=f"{history[-1][1]:.3f}")
    elapsed = time.perf_counter() - start
    first, last = history[0], history[-1]
    print(f"loss {first[0]:.3f} -> {last[0]:.3f}, contrastive top-1 {first[1]:.3f} -> {last[1]:.3f} "
          f"in {elapsed:.1f} s ({args.steps * args.batch_size / elapsed:.0f} images/s)")
    return {"first": first, "last": last}


if __name__ == "__main__":
    main()
