"""Gradient caching: a large batch's training step in micro-batches, against the plain step.

    python -m benchmarks.bench_grad_cache                 # CPU: ResNet-18 32 px, batch 1024 / micro 128
    python -m benchmarks.bench_grad_cache --device cuda   # GPU: ResNet-50 224 px bf16, 4096 / micro 256,
                                                          # and the largest batch with and without caching

A step is what ``python -m fastclr.train`` does once the views are made: two views of each
image (random tensors, made before timing) through the encoder and projection head, NT-Xent on
the whole batch, backward, LARS. "plain" forwards the whole batch at once; "cached" goes
through ``fastclr.grad_cache_backward`` in micro-batches (the same gradients without BatchNorm;
with it, statistics per micro-batch). Each configuration runs in its own process: a small
warm-up step, then one step whose peak extra memory is measured (CPU: the rise of the
process's resident high-water mark over the step, reset just before it; GPU:
torch.cuda.max_memory_allocated minus what was held before it: the model, its optimizer state
and the views), then --repeats timed steps (their median). ``--largest`` (GPU) doubles the
batch until a step runs out of memory, plain from 512 and cached from --batch (a single
untimed step each, up to --largest-cap). Results: benchmarks/results/grad_cache-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks import common


def _step(model, opt, views, micro):
    import torch

    import fastclr
    kind = views[0].device.type

    def loss_fn(z):  # the loss in float32, outside autocast, as fastclr.train computes it
        with torch.autocast(kind, enabled=False):
            z1, z2 = z.float().chunk(2)
            return fastclr.nt_xent_fused(z1, z2, 0.2)
    opt.zero_grad(set_to_none=True)
    with torch.autocast(kind, dtype=torch.bfloat16, enabled=kind == "cuda"):
        fastclr.grad_cache_backward(model, views, loss_fn, micro or views[0].shape[0])
    opt.step()


def _setup(arch, batch, size, device):
    import torch

    import fastclr
    from fastclr.app import models
    gpu = device == "cuda"
    torch.manual_seed(0)
    model = models.build_model(arch, cifar_stem=size <= 64).to(device)
    fmt = torch.channels_last if gpu else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = fastclr.LARS(fastclr.lars_param_groups(model, 1e-6), lr=0.3 * batch / 256, momentum=0.9)
    views = tuple(torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16 if gpu else torch.float32)
                  .contiguous(memory_format=fmt) for _ in range(2))
    return model, opt, views


def _row(arch, batch, micro, size, device) -> dict:
    """What names a configuration (micro 0: the plain step), as every row of it starts."""
    return {"model": arch, "batch": batch, "micro_batch": micro or None, "size": size, "device": device,
            "mode": "cached" if micro else "plain"}


def worker(arch: str, batch: int, micro: int, size: int, device: str, repeats: int) -> dict:
    """One configuration in this process (micro 0: the plain step). repeats 0: memory only."""
    row = _row(arch, batch, micro, size, device)
    try:
        model, opt, views = _setup(arch, batch, size, device)
        # warm-up on 4 images (threads, kernels), smaller than every configuration measured, so
        # what the allocator keeps from it is the same small base for all of them
        _step(model, opt, tuple(v[:4] for v in views), 2 if micro else 0)
        # every parameter's .grad and LARS state exist now: the step's extra memory is the rest
        row["peak_extra_mb"], _ = common.peak_extra_mb(device, lambda: _step(model, opt, views, micro))
        if repeats:  # the memory step was the warm-up at this size
            timer = common.cuda_median_time if device == "cuda" else common.median_time
            step, times = timer(lambda: _step(model, opt, views, micro), repeats, warmup=0)
            row.update(step_s=step, times_s=times, images_per_s=batch / step)
        row["status"] = "ok"
    except (RuntimeError, MemoryError) as exc:  # an out-of-memory is a result, not a crash
        row["status"] = "oom" if "memory" in str(exc).lower() else "error"
        row["error"] = str(exc).splitlines()[0][:300]
    return row


def run_one(arch, batch, micro, size, device, repeats, timeout) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_grad_cache", "--worker", arch, str(batch),
           str(micro or 0), str(size), device, str(repeats)]
    base = _row(arch, batch, micro, size, device)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "error": f"> {timeout} s"}
    if out.returncode != 0:  # killed (the OOM killer) or crashed
        return {**base, "status": "oom" if out.returncode in (-9, 137) else "error",
                "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest(arch, micro, size, device, start, cap, timeout) -> dict:
    """Doubles the batch from ``start`` while one step fits in the device's memory, up to cap."""
    best, batch, why = None, start, "search cap"
    while batch <= cap:
        r = run_one(arch, batch, micro, size, device, 0, timeout)
        if r["status"] != "ok":
            why = f"{r['status']} at batch {batch}"
            break
        best, batch = r, 2 * batch
    return {"kind": "largest_batch", "model": arch, "size": size, "device": device,
            "mode": "cached" if micro else "plain", "micro_batch": micro or None,
            "largest_batch": best["batch"] if best else None,
            "peak_extra_mb": best["peak_extra_mb"] if best else None, "stopped_by": why, "status": "ok"}


def table(rows: list) -> str:
    """Each step's peak extra memory and time, read against the plain step at the micro-batch
    size (memory) and at the full batch (time); then the largest batches found."""
    steps = [r for r in rows if r.get("kind") != "largest_batch"]
    ok = {(r["batch"], r["micro_batch"]): r for r in steps if r.get("status") == "ok"}
    lines = ["| model | size | batch | micro-batch | peak extra memory (MiB) | vs plain at the micro-batch "
             "| step (s) | vs plain at the batch | images/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in steps:
        if r.get("status") != "ok":
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['micro_batch'] or 'plain'} "
                         f"| {r.get('status')} | | | | |")
            continue
        small, whole = ok.get((r["micro_batch"], None)), ok.get((r["batch"], None))
        mem = f"{r['peak_extra_mb'] / small['peak_extra_mb']:.2f}x" if r["micro_batch"] and small else ""
        step = r.get("step_s")
        t = f"{step / whole['step_s']:.2f}x" if r["micro_batch"] and whole and step and whole.get("step_s") else ""
        timed = (f"{step:.2f}", t, f"{r['images_per_s']:.0f}") if step else ("", "", "")
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['micro_batch'] or 'plain'} | "
                     f"{r['peak_extra_mb']:.0f} | {mem} | {timed[0]} | {timed[1]} | {timed[2]} |")
    fits = [r for r in rows if r.get("kind") == "largest_batch"]
    if fits:
        lines += ["", "| model | size | step | largest batch that ran | its peak extra memory (MiB) | search stopped by |",
                  "|---|---:|---|---:|---:|---|"]
        for f in fits:
            how = f"cached, micro-batch {f['micro_batch']}" if f["micro_batch"] else "plain"
            mem = f"{f['peak_extra_mb']:.0f}" if f["peak_extra_mb"] is not None else ""
            lines.append(f"| {f['model']} | {f['size']} | {how} | {f['largest_batch'] or 'none'} | {mem} "
                         f"| {f['stopped_by']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_grad_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", help="default: resnet18 on CPU, resnet50 on GPU")
    p.add_argument("--image-size", type=int, help="default: 32 on CPU, 224 on GPU")
    p.add_argument("--batch", type=int, help="the large batch (default: 1024 CPU, 4096 GPU)")
    p.add_argument("--micro-batch", type=int, help="default: 128 CPU, 256 GPU")
    p.add_argument("--repeats", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--largest", action=argparse.BooleanOptionalAction, default=None,
                   help="search the largest batch, plain and cached (default: on GPU only)")
    p.add_argument("--largest-cap", type=int, default=8192, help="the search's largest batch")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    common.add_output_args(p)
    args = p.parse_args(argv)
    if args.worker:
        arch, batch, micro, size, device, repeats = args.worker
        print(json.dumps(worker(arch, int(batch), int(micro), int(size), device, int(repeats))))
        return
    gpu = args.device == "cuda"
    arch = args.model or ("resnet50" if gpu else "resnet18")
    size = args.image_size or (224 if gpu else 32)
    batch, micro = args.batch or (4096 if gpu else 1024), args.micro_batch or (256 if gpu else 128)
    # the plain step at the micro-batch (memory's yardstick), cached, plain at the batch (time's)
    configs = [(micro, 0), (batch, micro)] + ([] if gpu else [(batch, 0)])
    from tqdm import tqdm
    rows = [run_one(arch, b, m, size, args.device, args.repeats, args.timeout)
            for b, m in tqdm(configs, desc="bench_grad_cache", unit="config")]
    if args.largest if args.largest is not None else gpu:
        # plain from 512; cached from the batch it has just run (its memory hardly grows)
        rows += [largest(arch, m, size, args.device, start, args.largest_cap, args.timeout)
                 for m, start in ((0, 512), (micro, batch))]
    meta = {"machine": common.machine(args.device), "versions": common.versions("torch", "fastclr"),
            "repeats": args.repeats}
    common.publish("grad_cache", "benchmarks.bench_grad_cache",
                   f"Gradient caching: {arch} at {size} px, batch {batch} in micro-batches of {micro}, "
                   f"{common.where(meta)}, {'bf16' if gpu else 'float32'}", table(rows), rows, meta, args, argv)


if __name__ == "__main__":
    main()
