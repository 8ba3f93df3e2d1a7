"""NT-Xent on the CPU: fastclr's fused kernel against the reference, naive PyTorch and lightly.

    python -m benchmarks.bench_loss                      # M = 2048, 8192, 16384; D = 128
    python -m benchmarks.bench_loss --sizes 4096 --impls fused naive --repeats 3

Each (implementation, M) runs in its own process: its peak extra memory is the rise of the
process's resident high-water mark over one forward+backward (reset just before it, inputs
already allocated), and its times are medians over --repeats runs after a warm-up. An
implementation that runs out of memory is recorded as such. Results go to
benchmarks/results/loss-cpu-<date>.json and a markdown table is printed.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks import common

IMPLS = ("fused", "reference", "naive", "lightly", "pml")
PEERS = {"naive": "normalize, z @ z.T, mask diagonal, cross_entropy (plain PyTorch)",
         "reference": "fastclr.reference.nt_xent (the spec, O(M^2))",
         "fused": "fastclr.nt_xent_fused(impl='cpu')",
         "lightly": "lightly.loss.NTXentLoss",
         "pml": "pytorch_metric_learning.losses.NTXentLoss"}


def make_loss(impl: str, temperature: float):
    import torch
    import torch.nn.functional as F

    if impl == "fused":
        import fastclr
        return lambda a, b: fastclr.nt_xent_fused(a, b, temperature, impl="cpu")
    if impl == "reference":
        from fastclr import reference
        return lambda a, b: reference.nt_xent(a, b, temperature)
    if impl == "naive":
        def naive(a, b):
            z = F.normalize(torch.cat([a, b]), dim=1)
            s = z @ z.T / temperature
            m = s.shape[0]
            s = s.masked_fill(torch.eye(m, dtype=torch.bool), float("-inf"))
            return F.cross_entropy(s, (torch.arange(m) + m // 2) % m)
        return naive
    if impl == "lightly":
        from lightly.loss import NTXentLoss
        return NTXentLoss(temperature=temperature)
    if impl == "pml":
        from pytorch_metric_learning.losses import NTXentLoss
        loss = NTXentLoss(temperature=temperature)

        def pml(a, b):
            n = a.shape[0]
            labels = torch.arange(n).repeat(2)
            return loss(torch.cat([a, b]), labels)
        return pml
    raise ValueError(impl)


def worker(impl: str, m: int, d: int, repeats: int, temperature: float) -> dict:
    import torch

    torch.manual_seed(0)
    n = m // 2
    z1 = torch.randn(n, d, requires_grad=True)
    z2 = torch.randn(n, d, requires_grad=True)
    loss_fn = make_loss(impl, temperature)

    def fwd():
        with torch.no_grad():
            loss_fn(z1, z2)

    def fwd_bwd():
        z1.grad = z2.grad = None
        loss_fn(z1, z2).backward()

    row = {"impl": impl, "M": m, "D": d, "dtype": "float32", "temperature": temperature}
    try:
        loss_fn(z1[:4], z2[:4]).backward()  # lazy initialisation, thread pool
        z1.grad = z2.grad = None
        base = common.rss_bytes()
        common.reset_peak_rss()
        fwd_bwd()
        row["peak_extra_mb"] = (common.rss_bytes("VmHWM:") - base) / 2**20
        row["fwd_s"], row["fwd_times"] = common.median_time(fwd, repeats)
        row["fwd_bwd_s"], row["fwd_bwd_times"] = common.median_time(fwd_bwd, repeats)
        row["status"] = "ok"
    except (RuntimeError, MemoryError) as exc:  # an out-of-memory is a result, not a crash
        row["status"] = "oom" if "memory" in str(exc).lower() else "error"
        row["error"] = str(exc).splitlines()[0][:300]
    return row


def run_one(impl, m, d, repeats, temperature, timeout) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_loss", "--worker", impl, str(m), str(d),
           str(repeats), str(temperature)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "M": m, "D": d, "status": "timeout", "error": f"> {timeout} s"}
    if out.returncode != 0:  # killed (the OOM killer) or crashed
        status = "oom" if out.returncode in (-9, 137) else "error"
        return {"impl": impl, "M": m, "D": d, "status": status,
                "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list) -> str:
    """Markdown: one line per (M, impl); times in s, memory in MiB, ratio to naive."""
    naive = {r["M"]: r for r in rows if r["impl"] == "naive" and r.get("status") == "ok"}
    lines = ["| M | D | implementation | fwd (s) | fwd+bwd (s) | vs naive | peak extra memory (MiB) |",
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["M"], IMPLS.index(r["impl"]))):
        if r.get("status") != "ok":
            lines.append(f"| {r['M']} | {r['D']} | {r['impl']} | {r['status']} | | | |")
            continue
        ratio = (f"{r['fwd_bwd_s'] / naive[r['M']]['fwd_bwd_s']:.2f}x" if r["M"] in naive else "")
        lines.append(f"| {r['M']} | {r['D']} | {r['impl']} | {r['fwd_s']:.3f} | {r['fwd_bwd_s']:.3f} "
                     f"| {ratio} | {r['peak_extra_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 16384], help="M = 2N")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=["fused", "reference", "naive", "lightly"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    p.add_argument("--no-save", action="store_true", help="print only, write no results file")
    p.add_argument("--worker", nargs=5, metavar=("IMPL", "M", "D", "REPEATS", "TAU"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        impl, m, d, repeats, tau = args.worker
        print(json.dumps(worker(impl, int(m), int(d), int(repeats), float(tau))))
        return
    if any(m < 2 or m % 2 for m in args.sizes):
        p.error("--sizes must be even and >= 2 (M = 2N rows)")

    from tqdm import tqdm

    configs = [(impl, m) for m in args.sizes for impl in args.impls]
    rows = []
    for impl, m in tqdm(configs, desc="bench_loss", unit="config"):
        rows.append(run_one(impl, m, args.dim, args.repeats, args.temperature, args.timeout))
    meta = {"machine": common.machine("cpu"),
            "versions": common.versions("torch", "fastclr", "lightly", "pytorch-metric-learning"),
            "peers": {k: PEERS[k] for k in args.impls}}
    print(f"\nNT-Xent forward+backward, float32, {meta['machine']['cpu']}, "
          f"{meta['machine']['torch_threads']} threads, torch {meta['versions']['torch']}\n")
    print(table(rows))
    if not args.no_save:
        print(f"\nresults: {common.write_results('loss', 'benchmarks.bench_loss', rows, meta)}")


if __name__ == "__main__":
    main()
