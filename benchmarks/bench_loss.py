"""NT-Xent and SupCon: fastclr's fused kernels against the reference, naive PyTorch and peers.

    python -m benchmarks.bench_loss                      # CPU: M = 2048, 8192, 16384; D = 128
    python -m benchmarks.bench_loss --sizes 4096 --impls cpu naive --repeats 3
    python -m benchmarks.bench_loss --device cuda        # GPU: M = 4096 .. 65536, bfloat16
    python -m benchmarks.bench_loss --loss supcon --labels classes:100   # SupCon, 100 classes
    python -m benchmarks.bench_loss --loss supcon --labels views:4       # 4 views of M/4 images

NT-Xent peers: naive PyTorch, lightly's and pytorch-metric-learning's NTXentLoss, inf-cl.
SupCon ("mean" positives, SupCon's L_out) peers: a naive PyTorch SupCon (the M x M logits, a
log-softmax and the label masks, as the official SupContrast code) and pytorch-metric-learning's
SupConLoss; labels either classes:K (uniform random classes) or views:V (labels arange(M/V)
repeated V times: multi-view SimCLR).

Each (implementation, M) runs in its own process. CPU: peak extra memory is the rise of the
process's resident high-water mark over one forward+backward (reset just before it, inputs
already allocated). GPU: torch.cuda.max_memory_allocated over one forward+backward minus the
memory held before it; times from CUDA events. Times are medians over --repeats runs after a
warm-up; TFLOP/s count the matrix products the algorithm needs (forward 2 M^2 D flops,
forward+backward 5 M^2 D with the symmetric backward), whatever an implementation really
does; on a GPU they are also read against the dense matrix product's TFLOP/s in that dtype,
measured in the same run (8192^3). An implementation that runs out of memory is recorded as such. Results go to
benchmarks/results/loss-<device>-<date>.json (or --out-dir) and a markdown table is printed.

fastclr's rows are named by backend, as ``impl=`` names them: "cpu" (the C++ kernel), "triton",
"cuda" (the hand-written CUDA kernel), "reference". (Results files written before this naming
call the device's default backend "fused": read as "cpu" on a CPU, "triton" on a GPU.) "infcl" is inf-cl's
cal_inf_loss, a CLIP-style loss: with q = z1, k = z2 it scores N x N logits, a quarter of
NT-Xent's M x M, so its TFLOP/s column is computed on its own N^2 products.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks import common

IMPLS = ("cpu", "triton", "cuda", "reference", "naive", "lightly", "pml", "infcl")
SUPCON_IMPLS = ("cpu", "triton", "cuda", "reference", "naive", "pml")
PEERS = {"naive": "normalize, z @ z.T, mask diagonal, cross_entropy (plain PyTorch)",
         "reference": "fastclr.reference.nt_xent (the spec, O(M^2))",
         "cpu": "fastclr.nt_xent_fused(impl='cpu'): the C++ kernel",
         "triton": "fastclr.nt_xent_fused(impl='triton'): the Triton kernels",
         "cuda": "fastclr.nt_xent_fused(impl='cuda'): the hand-written CUDA kernel",
         "lightly": "lightly.loss.NTXentLoss",
         "pml": "pytorch_metric_learning.losses.NTXentLoss",
         "infcl": "inf_cl.cal_inf_loss(z1, z2) (CLIP-style, N x N logits)"}
# On a CPU, pytorch-metric-learning's NTXentLoss needs 17 GiB and ~30 s per call at M = 1024
# (measured) and grows as M^2 and more: above 512 it is recorded as skipped rather than run into
# the OOM killer and the suite's time budget.
CPU_MAX_M = {"pml": 512}
# pytorch-metric-learning's SupConLoss holds ~30 M x M float32 matrices (measured: 480 MiB at
# M = 2048): 30 GiB at M = 16384 is beyond this machine, so on a CPU it stops at 8192.
SUPCON_CPU_MAX_M = {"pml": 8192}
SUPCON_PEERS = {"naive": "normalize, z @ z.T, mask diagonal, log_softmax, masked mean over positives "
                         "(plain PyTorch, as SupContrast)",
                "reference": "fastclr.reference.supcon (the spec, O(M^2))",
                "cpu": "fastclr.supcon_fused(impl='cpu'): the C++ kernel",
                "triton": "fastclr.supcon_fused(impl='triton'): the Triton kernels",
                "cuda": "fastclr.supcon_fused(impl='cuda'): the hand-written CUDA kernel",
                "pml": "pytorch_metric_learning.losses.SupConLoss"}
DTYPES = {"float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
          "float16": "float16"}


def make_loss(impl: str, temperature: float, device: str):
    import torch
    import torch.nn.functional as F

    if impl in ("cpu", "triton", "cuda"):
        import fastclr
        return lambda a, b: fastclr.nt_xent_fused(a, b, temperature, impl=impl)
    if impl == "reference":
        from fastclr import reference
        return lambda a, b: reference.nt_xent(a, b, temperature)
    if impl == "naive":
        def naive(a, b):
            z = F.normalize(torch.cat([a, b]), dim=1)
            s = z @ z.T / temperature
            m = s.shape[0]
            s = s.masked_fill(torch.eye(m, dtype=torch.bool, device=s.device), float("-inf"))
            return F.cross_entropy(s, (torch.arange(m, device=s.device) + m // 2) % m)
        return naive
    if impl == "lightly":
        from lightly.loss import NTXentLoss
        return NTXentLoss(temperature=temperature)
    if impl == "pml":
        from pytorch_metric_learning.losses import NTXentLoss
        loss = NTXentLoss(temperature=temperature)

        def pml(a, b):
            n = a.shape[0]
            labels = torch.arange(n, device=a.device).repeat(2)
            return loss(torch.cat([a, b]), labels)
        return pml
    if impl == "infcl":
        import torch.distributed as dist
        from inf_cl import cal_inf_loss
        if not dist.is_initialized():  # inf-cl asks for a process group, even of one
            dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                    init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        return lambda a, b: cal_inf_loss(F.normalize(a, dim=1), F.normalize(b, dim=1),
                                         scale=torch.tensor(1.0 / temperature, device=a.device))
    raise ValueError(impl)


def make_labels(spec: str, m: int, device: str):
    """classes:K -> uniform random labels in [0, K); views:V -> arange(M / V) repeated V times."""
    import torch
    kind, _, k = spec.partition(":")
    g = torch.Generator().manual_seed(1)
    if kind == "classes":
        return torch.randint(0, int(k), (m,), generator=g).to(device)
    if kind == "views":
        return torch.arange(m // int(k)).repeat(int(k)).to(device)
    raise ValueError(f"labels spec {spec!r}: classes:K or views:V")


def make_supcon(impl: str, temperature: float):
    """(z, labels) -> SupCon ("mean" positives) of one implementation."""
    import torch
    import torch.nn.functional as F

    if impl in ("cpu", "triton", "cuda"):
        import fastclr
        return lambda z, y: fastclr.supcon_fused(z, y, temperature, impl=impl)
    if impl == "reference":
        from fastclr import reference
        return lambda z, y: reference.supcon(z, y, temperature)
    if impl == "naive":
        def naive(z, y):
            u = F.normalize(z, dim=1)
            m = u.shape[0]
            eye = torch.eye(m, dtype=torch.bool, device=u.device)
            log_prob = (u @ u.T / temperature).masked_fill(eye, float("-inf")).log_softmax(dim=1)
            same = (y[:, None] == y[None, :]) & ~eye
            count = same.sum(1)
            rows = -torch.where(same, log_prob, 0.0).sum(1) / count.clamp_min(1)
            return rows[count > 0].mean()
        return naive
    if impl == "pml":
        from pytorch_metric_learning.losses import SupConLoss
        return SupConLoss(temperature=temperature)
    raise ValueError(impl)


def worker(impl: str, m: int, d: int, repeats: int, temperature: float, device: str,
           dtype_name: str, budget_mb: float = 0.0, loss: str = "ntxent", labels: str = "") -> dict:
    """One configuration (pml: a single timed call on CPU, see CPU_MAX_M). repeats == 0: a single forward+backward, for its peak memory only
    (the largest-batch search); on a GPU budget_mb then caps this process's CUDA memory."""
    import torch
    if device == "cuda" and budget_mb > 0:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget_mb * 2**20 / total))

    torch.manual_seed(0)
    dtype = getattr(torch, DTYPES[dtype_name])
    n = m // 2
    z1 = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    z2 = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    row = {"impl": impl, "M": m, "D": d, "dtype": DTYPES[dtype_name], "temperature": temperature,
           "device": device}
    try:
        if loss == "supcon":  # z = [z1; z2] with labels: the same (a, b) -> loss interface
            row.update(loss="supcon", labels=labels)
            y = make_labels(labels, m, device)
            supcon = make_supcon(impl, temperature)
            loss_fn = lambda a, b: supcon(torch.cat([a, b]), y[:2 * a.shape[0]])  # noqa: E731
        else:
            loss_fn = make_loss(impl, temperature, device)

        def fwd():
            with torch.no_grad():
                loss_fn(z1, z2)

        def fwd_bwd():
            z1.grad = z2.grad = None
            loss_fn(z1, z2).backward()

        loss_fn(z1[:64], z2[:64]).backward()  # lazy initialisation, compilation, thread pool
        z1.grad = z2.grad = None
        row["peak_extra_mb"], _ = common.peak_extra_mb(device, fwd_bwd)
        timer = common.cuda_median_time if device == "cuda" else common.median_time
        if repeats == 0:
            row["status"] = "ok"
            return row
        row["fwd_s"], row["fwd_times"] = timer(fwd, repeats)
        row["fwd_bwd_s"], row["fwd_bwd_times"] = timer(fwd_bwd, repeats)
        logits = (n * n) if impl == "infcl" else (m * m)
        row["fwd_tflops"] = 2 * logits * d / row["fwd_s"] / 1e12
        row["fwd_bwd_tflops"] = 5 * logits * d / row["fwd_bwd_s"] / 1e12
        row["status"] = "ok"
    except ImportError as exc:
        row["status"] = "missing"
        row["error"] = str(exc)[:300]
    except (RuntimeError, MemoryError) as exc:  # an out-of-memory is a result, not a crash
        row["status"] = "oom" if "memory" in str(exc).lower() else "error"
        row["error"] = str(exc).splitlines()[0][:300]
    return row


def run_one(impl, m, d, repeats, temperature, timeout, device, dtype, budget_mb=0.0,
            loss="ntxent", labels="") -> dict:
    limit = (SUPCON_CPU_MAX_M if loss == "supcon" else CPU_MAX_M).get(impl, m)
    if device == "cpu" and m > limit:
        why = (f"{impl} would need ~30 GiB at M=16384 on CPU" if loss == "supcon"
               else f"{impl} needs 17 GiB and ~30 s a call at M=1024 on CPU")
        return {"impl": impl, "M": m, "D": d, "status": "skipped", "device": device, "error": why}
    if device == "cpu" and impl == "pml" and loss != "supcon":
        repeats = min(repeats, 1)  # ~30 s a call
    cmd = [sys.executable, "-m", "benchmarks.bench_loss", "--worker", impl, str(m), str(d),
           str(repeats), str(temperature), device, dtype, str(budget_mb), loss, labels or "-"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "M": m, "D": d, "status": "timeout", "error": f"> {timeout} s"}
    if out.returncode != 0:  # killed (the OOM killer) or crashed
        status = "oom" if out.returncode in (-9, 137) else "error"
        return {"impl": impl, "M": m, "D": d, "status": status,
                "error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def largest_batch(impl, d, temperature, timeout, device, dtype, budget_mb, cap, **extra) -> dict:
    """Doubles M from 1024 while one forward+backward stays within budget_mb of extra memory
    (measured; on a GPU also enforced, so going over is a real out-of-memory), up to cap."""
    best, m, why = None, 1024, "search cap"
    if device == "cpu" and impl in CPU_MAX_M:
        cap, why = 0, f"skipped ({impl} needs 17 GiB at M=1024 on CPU)"
    while m <= cap:
        r = run_one(impl, m, d, 0, temperature, timeout, device, dtype, budget_mb, **extra)
        if r.get("status") != "ok":
            why = f"{r.get('status')} at M={m}"
            break
        if r["peak_extra_mb"] > budget_mb:
            why = f"{r['peak_extra_mb']:.0f} MiB at M={m}"
            break
        best, m = (m, r["peak_extra_mb"]), 2 * m
    return {"kind": "largest_batch", "impl": impl, "D": d, "budget_mb": budget_mb,
            "largest_M": best[0] if best else None, "peak_extra_mb": best[1] if best else None,
            "stopped_by": why, "device": device, "status": "ok"}


def matmul_peak_tflops(dtype_name: str, n: int = 8192, repeats: int = 10) -> float:
    """What this GPU's dense matrix product reaches in this dtype (n x n x n, median of CUDA-event
    timings): the ceiling the loss's TFLOP/s are read against, measured in the same run."""
    import torch
    dtype = getattr(torch, DTYPES[dtype_name])
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    seconds, _ = common.cuda_median_time(lambda: a @ b, repeats, warmup=3)
    return 2 * n**3 / seconds / 1e12


def legacy_name(row: dict) -> dict:
    """Rows of results files from before the backend naming: "fused" was the device's default."""
    if row.get("impl") == "fused":
        return {**row, "impl": "triton" if row.get("device") == "cuda" else "cpu"}
    return row


def fit_table(fits: list) -> str:
    lines = ["| implementation | largest M within budget | its peak extra memory (MiB) | search stopped by |",
             "|---|---:|---:|---|"]
    for f in map(legacy_name, fits):
        m = f"{f['largest_M']}" + ("+" if f["stopped_by"] == "search cap" else "") if f["largest_M"] else "< 1024"
        mem = f"{f['peak_extra_mb']:.0f}" if f["peak_extra_mb"] is not None else ""
        lines.append(f"| {f['impl']} | {m} | {mem} | {f['stopped_by']} |")
    return "\n".join(lines)


def tables(rows: list, peak_tflops: float | None = None) -> str:
    """The timing table, then the largest-batch table when the rows hold a search."""
    out = table(rows, peak_tflops)
    fits = [r for r in rows if r.get("kind") == "largest_batch"]
    if fits:
        out += (f"\n\nLargest M (doubling from 1024) whose forward+backward fits in "
                f"{fits[0]['budget_mb']:.0f} MiB of extra memory, D = {fits[0]['D']}:\n\n"
                + fit_table(fits))
    return out


def table(rows: list, peak_tflops: float | None = None) -> str:
    """Markdown: one line per (M, impl); times in s, memory in MiB, ratio to naive; on a GPU the
    achieved TFLOP/s and, given the measured matmul peak, their share of it."""
    rows = [legacy_name(r) for r in rows]
    # skipped configurations (pml beyond its CPU limit) stay in the results file, not the table
    rows = [r for r in rows if r.get("kind") != "largest_batch" and r.get("status") != "skipped"]
    naive = {(r["M"], r["D"]): r for r in rows if r["impl"] == "naive" and r.get("status") == "ok"}
    gpu = any(r.get("device") == "cuda" for r in rows)
    head = "| M | D | implementation | fwd (s) | fwd+bwd (s) | vs naive | peak extra memory (MiB) |"
    rule = "|---:|---:|---|---:|---:|---:|---:|"
    peak = bool(gpu and peak_tflops)
    if gpu:
        head, rule = head + " fwd+bwd TFLOP/s |", rule + "---:|"
    if peak:
        head, rule = head + f" of matmul peak ({peak_tflops:.0f}) |", rule + "---:|"
    lines = [head, rule]
    for r in sorted(rows, key=lambda r: (r["M"], r["D"], IMPLS.index(r["impl"]))):
        if r.get("status") != "ok":
            lines.append(f"| {r['M']} | {r['D']} | {r['impl']} | {r['status']} | | | |"
                         + (" |" if gpu else "") + (" |" if peak else ""))
            continue
        key = (r["M"], r["D"])
        ratio = f"{r['fwd_bwd_s'] / naive[key]['fwd_bwd_s']:.2f}x" if key in naive else ""
        line = (f"| {r['M']} | {r['D']} | {r['impl']} | {r['fwd_s']:.4f} | {r['fwd_bwd_s']:.4f} "
                f"| {ratio} | {r['peak_extra_mb']:.0f} |")
        line += f" {r['fwd_bwd_tflops']:.0f} |" if gpu else ""
        line += f" {100 * r['fwd_bwd_tflops'] / peak_tflops:.0f}% |" if peak else ""
        lines.append(line)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", help="M = 2N (default: by device)")
    p.add_argument("--dims", "--dim", type=int, nargs="+", default=[128], help="D values")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on CPU, bf16 on GPU")
    p.add_argument("--impls", nargs="+", choices=IMPLS, help="default: by device")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    common.add_output_args(p)
    p.add_argument("--sweep-dims", type=int, nargs="*", default=[],
                   help="extra D values, measured at --sweep-m only")
    p.add_argument("--sweep-m", type=int, default=4096)
    p.add_argument("--budget-mb", type=float, default=0,
                   help="also find each implementation's largest M (doubling from 1024) whose "
                        "forward+backward fits in this much extra memory (0: skip)")
    p.add_argument("--max-search-m", type=int, help="stop the search here (default: 131072 on "
                                                     "CPU, 1048576 on GPU)")
    p.add_argument("--loss", choices=["ntxent", "supcon"], default="ntxent")
    p.add_argument("--labels", default="classes:100",
                   help="SupCon's labels: classes:K (random classes) or views:V (V views per image)")
    p.add_argument("--worker", nargs=10, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        impl, m, d, repeats, tau, device, dtype, budget, loss, labels = args.worker
        print(json.dumps(worker(impl, int(m), int(d), int(repeats), float(tau), device, dtype,
                                float(budget), loss, labels)))
        return
    gpu = args.device == "cuda"
    sizes = args.sizes or ([4096, 16384, 65536] if gpu else [2048, 8192, 16384])
    dtype = args.dtype or ("bf16" if gpu else "float32")
    supcon = args.loss == "supcon"
    if supcon:
        impls = args.impls or (["triton", "cuda", "naive", "pml"] if gpu else ["cpu", "naive", "pml"])
        if any(i not in SUPCON_IMPLS for i in impls):
            p.error(f"--loss supcon takes --impls among {SUPCON_IMPLS}")
        try:
            make_labels(args.labels, 8, "cpu")
        except ValueError as exc:
            p.error(str(exc))
    else:
        impls = args.impls or (["triton", "cuda", "naive", "lightly", "pml", "infcl"] if gpu
                               else ["cpu", "reference", "naive", "lightly", "pml"])
    if any(m < 2 or m % 2 for m in sizes):
        p.error("--sizes must be even and >= 2 (M = 2N rows)")
    extra = dict(loss=args.loss, labels=args.labels if supcon else "")

    from tqdm import tqdm

    configs = [(impl, m, d) for d in args.dims for m in sizes for impl in impls]
    configs += [(impl, args.sweep_m, d) for d in args.sweep_dims for impl in impls]
    rows = []
    for impl, m, d in tqdm(configs, desc="bench_loss", unit="config"):
        rows.append(run_one(impl, m, d, args.repeats, args.temperature, args.timeout,
                            args.device, dtype, **extra))
    fits = []
    if args.budget_mb > 0:
        cap = args.max_search_m or (1 << 20 if gpu else 1 << 17)
        for impl in tqdm(impls, desc="largest batch", unit="impl"):
            fits.append(largest_batch(impl, args.dims[0], args.temperature, args.timeout,
                                      args.device, dtype, args.budget_mb, cap, **extra))
    meta = {"machine": common.machine(args.device),
            "versions": common.versions("torch", "triton", "fastclr", "lightly",
                                        "pytorch-metric-learning", "inf-cl"),
            "peers": {k: (SUPCON_PEERS if supcon else PEERS)[k] for k in impls}}
    if supcon:
        meta["labels"] = args.labels
    if fits:
        meta["budget_mb"] = args.budget_mb
    if gpu:
        meta["matmul_peak_tflops"] = matmul_peak_tflops(dtype)
    title = f"SupCon (mean positives, labels {args.labels})" if supcon else "NT-Xent"
    common.publish("supcon" if supcon else "loss", "benchmarks.bench_loss",
                   f"{title} forward+backward, {DTYPES[dtype]}, {common.where(meta)}, "
                   f"torch {meta['versions']['torch']}", tables(rows + fits, meta.get("matmul_peak_tflops")),
                   rows + fits, meta, args, argv)


if __name__ == "__main__":
    main()
