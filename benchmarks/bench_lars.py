"""LARS step time over the ResNet-18 and ResNet-50 parameter sets.

    python -m benchmarks.bench_lars                    # CPU
    python -m benchmarks.bench_lars --device cuda      # GPU

Each fastclr implementation against lightly's LARS and timm's Lars, with torch's SGD (foreach
and fused) as the floor: a step with no trust ratio at all. Parameters come from torchvision's
models (SimCLR's param groups: biases and BN excluded), gradients are random; each row is the
median of --repeats steps after --warmup, all in one process, optimizers interleaved round by
round so drifting machine load hits all alike. Results go to benchmarks/results/lars-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks import common

OPTIMIZERS = ("fastclr-cpu", "fastclr-cuda", "fastclr-foreach", "lightly", "timm", "sgd-foreach",
              "sgd-fused")


def make_optimizer(name: str, model: torch.nn.Module):
    from fastclr import LARS, lars_param_groups
    groups = lars_param_groups(model, weight_decay=1e-6)
    if name.startswith("fastclr-"):
        return LARS(groups, lr=0.3, momentum=0.9, impl=name.split("-", 1)[1])
    if name == "lightly":
        from lightly.utils.lars import LARS as LightlyLARS
        return LightlyLARS(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6)
    if name == "timm":
        from timm.optim import Lars
        return Lars(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6)
    if name in ("sgd-foreach", "sgd-fused"):
        fused = name == "sgd-fused"
        return torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-6,
                               foreach=not fused, fused=fused or None)
    raise ValueError(name)


def bench_model(arch: str, names, device: str, repeats: int, warmup: int) -> list:
    import torchvision
    torch.manual_seed(0)
    base = getattr(torchvision.models, arch)()
    n_params = sum(p.numel() for p in base.parameters())
    n_tensors = len(list(base.parameters()))
    runs = {}
    for name in names:
        model = torchvision.models.__dict__[arch]().to(device)
        model.load_state_dict(base.state_dict())
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        try:
            runs[name] = (model, make_optimizer(name, model), [])
        except (ImportError, RuntimeError, ValueError) as exc:
            runs[name] = (None, None, str(exc).splitlines()[0][:200])

    def one_step(opt):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for i in range(warmup + repeats):
        for name, (model, opt, times) in runs.items():
            if opt is None:
                continue
            dt = one_step(opt)
            if i >= warmup:
                times.append(dt)
    rows = []
    for name, (model, opt, times) in runs.items():
        row = {"model": arch, "params": n_params, "tensors": n_tensors, "optimizer": name,
               "device": device}
        if opt is None:
            row.update(status="missing", error=times)
        else:
            row.update(status="ok", step_ms=1e3 * statistics.median(times),
                       times_ms=[1e3 * t for t in times])
        rows.append(row)
    return rows


def table(rows: list) -> str:
    lines = ["| model | optimizer | step (ms) | vs lightly | vs SGD (foreach) |",
             "|---|---|---:|---:|---:|"]
    for arch in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == arch]
        ref = {r["optimizer"]: r.get("step_ms") for r in group}
        for r in group:
            if r["status"] != "ok":
                lines.append(f"| {arch} | {r['optimizer']} | {r['status']} | | |")
                continue
            vs_l = f"{r['step_ms'] / ref['lightly']:.2f}x" if ref.get("lightly") else ""
            vs_s = f"{r['step_ms'] / ref['sgd-foreach']:.2f}x" if ref.get("sgd-foreach") else ""
            lines.append(f"| {arch} | {r['optimizer']} | {r['step_ms']:.1f} | {vs_l} | {vs_s} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_lars", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    common.add_output_args(p)
    args = p.parse_args(argv)
    names = args.optimizers or [n for n in OPTIMIZERS
                                if not (args.device == "cpu" and n == "fastclr-cuda")
                                and not (args.device == "cuda" and n == "fastclr-cpu")]
    rows = []
    for arch in args.models:
        rows += bench_model(arch, names, args.device, args.repeats, args.warmup)
    meta = {"machine": common.machine(args.device),
            "versions": common.versions("torch", "torchvision", "fastclr", "lightly", "timm")}
    common.publish("lars", "benchmarks.bench_lars",
                   f"LARS step, float32, {common.where(meta)}, torch {meta['versions']['torch']}",
                   table(rows), rows, meta, args, argv)


if __name__ == "__main__":
    main()
