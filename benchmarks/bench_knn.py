"""kNN search for the evaluation monitor: fastclr.knn_topk against the usual torch code and faiss.

    python -m benchmarks.bench_knn                    # CPU: 10,000 queries x 100,000 bank, D=128, k=200
    python -m benchmarks.bench_knn --device cuda      # GPU: 50,000 x 1,000,000

Implementations (float32, cosine similarity, the k best per query):
- fastclr: ``fastclr.knn_topk`` (CPU: the C++ kernel with its default screen, bfloat16 on CPUs
  with bf16 dot instructions; GPU: Triton tiles + merge);
- fastclr-fp32 (CPU): the same kernel with its float32 screen (``FASTCLR_KNN_SCREEN=fp32``:
  what CPUs without bf16 dot instructions run);
- fastclr-cuda (GPU): ``knn_topk(..., impl="cuda")``, tiles from kernels/similarity.cu;
- torch: the usual monitor code -- normalise both, then per chunk of 1024 queries
  ``q @ bank.T`` and ``torch.topk`` (memory 1024 x K per chunk);
- faiss: ``faiss.IndexFlatIP`` (exact inner-product search) on L2-normalised copies.

Peak extra memory: each implementation in its own process, the rise of the resident high-water
mark (GPU: max_memory_allocated) over one search, inputs already in memory. Time: all
implementations in one process, searches interleaved round by round (so drifting machine load,
large on shared VMs, hits all alike), median of --repeats after a warm-up. Indices are compared with a float64 reference (exact top-k of the
float64 similarities, ties to the lower index): "index mismatches" counts positions that differ;
a float32 search can only differ where float64 values are within float32 rounding.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks import common

IMPLS = ("fastclr", "fastclr-fp32", "fastclr-cuda", "torch", "faiss")
DEFAULT_IMPLS = {"cpu": ("fastclr", "fastclr-fp32", "torch", "faiss"),
                 "cuda": ("fastclr", "fastclr-cuda", "torch", "faiss")}


def _data(m, n, d, device):
    import torch
    g = torch.Generator().manual_seed(0)
    q = torch.randn(m, d, generator=g)
    bank = torch.randn(n, d, generator=g)
    return q.to(device), bank.to(device)


def make_search(impl, k, device):
    import torch
    import torch.nn.functional as F
    if impl == "fastclr":
        import fastclr
        return lambda q, b: fastclr.knn_topk(q, b, k)
    if impl == "fastclr-fp32":
        import os

        import fastclr

        def search(q, b):
            os.environ["FASTCLR_KNN_SCREEN"] = "fp32"  # read by the kernel at each call
            try:
                return fastclr.knn_topk(q, b, k)
            finally:
                del os.environ["FASTCLR_KNN_SCREEN"]
        return search
    if impl == "fastclr-cuda":
        import fastclr
        return lambda q, b: fastclr.knn_topk(q, b, k, impl="cuda")
    if impl == "torch":
        def search(q, b):
            bn = F.normalize(b, dim=1)
            vals, idx = [], []
            for qc in torch.split(F.normalize(q, dim=1), 1024):
                v, i = torch.topk(qc @ bn.T, k, dim=1)
                vals.append(v)
                idx.append(i)
            return torch.cat(vals), torch.cat(idx)
        return search
    if impl == "faiss":
        import faiss
        import numpy as np

        def search(q, b):
            bn = F.normalize(b, dim=1).cpu().numpy()
            qn = np.ascontiguousarray(F.normalize(q, dim=1).cpu().numpy())
            index = faiss.IndexFlatIP(bn.shape[1])
            index.add(bn)
            v, i = index.search(qn, k)
            return torch.from_numpy(v), torch.from_numpy(i)
        return search
    raise ValueError(impl)


def reference_indices(q, bank, k, chunk=256):
    """Exact float64 top-k indices, ties to the lower index (k + 16 candidates, stable re-sort)."""
    import torch
    import torch.nn.functional as F
    bn = F.normalize(bank.double(), dim=1)
    out = []
    for qc in torch.split(F.normalize(q.double(), dim=1), chunk):
        s = qc @ bn.T
        v, i = torch.topk(s, min(k + 16, s.shape[1]), dim=1)
        i_sorted, order = torch.sort(i, dim=1)
        v_sorted = v.gather(1, order)
        _, o2 = torch.sort(v_sorted, dim=1, descending=True, stable=True)
        out.append(i_sorted.gather(1, o2)[:, :k])
    return torch.cat(out)


def worker(impl, m, n, d, k, repeats, device) -> dict:
    """One search of one implementation in a fresh process: its peak extra memory and indices."""
    import torch
    row = {"impl": impl, "queries": m, "bank": n, "D": d, "k": k, "device": device}
    q, bank = _data(m, n, d, device)
    try:
        search = make_search(impl, k, device)
        search(q[:64], bank[:4096])  # imports, thread pools
        row["peak_extra_mb"], (_, idx) = common.peak_extra_mb(device, lambda: search(q, bank))
        ref = reference_indices(q, bank, k)
        row["index_mismatches"] = int((idx.cpu().long() != ref.cpu()).sum())
        row["status"] = "ok"
    except ImportError as exc:
        row.update(status="missing", error=str(exc)[:200])
    except (RuntimeError, MemoryError) as exc:
        row.update(status="oom" if "memory" in str(exc).lower() else "error",
                   error=str(exc).splitlines()[0][:300])
    return row


def interleaved_times(impls, m, n, d, k, repeats, device) -> dict:
    """impl -> per-round seconds, the implementations taking turns within each round."""
    import time

    import torch
    q, bank = _data(m, n, d, device)
    searches = {}
    for impl in impls:
        try:
            searches[impl] = make_search(impl, k, device)
            searches[impl](q[:64], bank[:4096])
        except ImportError:
            pass
    times = {impl: [] for impl in searches}
    for r in range(repeats + 1):
        for impl, search in searches.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            search(q, bank)
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                times[impl].append(time.perf_counter() - t0)
    return times


def table(rows) -> str:
    lines = ["| queries x bank, D, k | implementation | search (s) | vs faiss | peak extra memory (MiB) | index mismatches vs float64 |",
             "|---|---|---:|---:|---:|---:|"]
    faiss_t = {(r["queries"], r["bank"]): r["search_s"] for r in rows
               if r["impl"] == "faiss" and r.get("status") == "ok"}
    for r in rows:
        shape = f"{r['queries']} x {r['bank']}, {r['D']}, {r['k']}"
        if r.get("status") != "ok":
            lines.append(f"| {shape} | {r['impl']} | {r['status']} | | | |")
            continue
        f = faiss_t.get((r["queries"], r["bank"]))
        ratio = f"{r['search_s'] / f:.2f}x" if f else ""
        lines.append(f"| {shape} | {r['impl']} | {r['search_s']:.3f} | {ratio} | {r['peak_extra_mb']:.0f} "
                     f"| {r['index_mismatches']} of {r['queries'] * r['k']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_knn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--queries", type=int)
    p.add_argument("--bank", type=int)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--impls", nargs="+", choices=IMPLS,
                   help="default: fastclr fastclr-fp32 torch faiss (CPU), fastclr fastclr-cuda torch faiss (GPU)")
    p.add_argument("--repeats", type=int, default=5)
    common.add_output_args(p)
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        impl, m, n, d, k, repeats, device = args.worker
        print(json.dumps(worker(impl, int(m), int(n), int(d), int(k), int(repeats), device)))
        return
    gpu = args.device == "cuda"
    m = args.queries or (50_000 if gpu else 10_000)
    n = args.bank or (1_000_000 if gpu else 100_000)
    rows = []
    for impl in args.impls or DEFAULT_IMPLS[args.device]:
        cmd = [sys.executable, "-m", "benchmarks.bench_knn", "--worker", impl, str(m), str(n),
               str(args.dim), str(args.k), str(args.repeats), args.device]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append({"impl": impl, "queries": m, "bank": n, "D": args.dim, "k": args.k,
                         "status": "oom" if out.returncode in (-9, 137) else "error",
                         "error": (out.stderr.strip().splitlines() or ["?"])[-1][:300]})
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"bench_knn: {impl}: memory and indices: {rows[-1].get('status')}", flush=True)
    import statistics
    times = interleaved_times([r["impl"] for r in rows if r.get("status") == "ok"], m, n, args.dim,
                              args.k, args.repeats, args.device)
    for r in rows:
        if r["impl"] in times:
            r["times_s"] = times[r["impl"]]
            r["search_s"] = statistics.median(times[r["impl"]])
    meta = {"machine": common.machine(args.device),
            "versions": common.versions("torch", "fastclr", "faiss-cpu")}
    common.publish("knn", "benchmarks.bench_knn", f"kNN search, float32, {common.where(meta)}",
                   table(rows), rows, meta, args, argv)


if __name__ == "__main__":
    main()
