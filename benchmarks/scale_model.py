"""On paper, toward internet scale: the distributed loss's per-rank work, traffic and memory.

    python -m benchmarks.scale_model                     # docs/scaling.md's table
    python -m benchmarks.scale_model --worlds 8 64 --batches 256 --dim 256

For W GPUs with b images each (M = 2 b W rows of D features, bf16), three designs of the loss:

- **local** (fastclr): all-gather the M x D embeddings; each rank's forward scores its 2b rows
  against all M (1/W of the work); its backward recomputes the symmetric tiles I <= J that meet
  its rows and returns the gradient of all M rows, which one reduce-scatter sums to their
  owners. Not overlapped with compute: the collectives sit on the critical path.
- **replica** (fastclr before local rows, and the common "gather, then full loss" code): every
  rank computes the whole M x M loss, forward and backward; the backward all-reduces M x D.
- **ring** (Inf-CL's ring.py): no gather; blocks of columns travel rank to rank, W - 1 hops in
  the forward and again (with their gradients) in the backward, overlapped with the tiles'
  compute; no symmetric-tile saving (each rank sees each pair once from its own side).

Counts: matrix-product FLOPs by tiles of T = 64 rows (the GPU kernels' tile; forward 2 T^2 D per
tile; backward 2 T^2 D to recompute S plus 2 T^2 D per gradient product, one on a diagonal tile,
two off it), exponentials (forward one per score; backward two per off-diagonal pair, one per
diagonal), and bytes each rank sends. Times at stated rates (below); compute time adds the
tensor-core and exponential parts (no overlap assumed between them), a collective's time is its
bytes over the link bandwidth (NVLink inside an 8-GPU node, InfiniBand beyond). These are
models, not measurements: gpu_suite.sh measures the kernels' real rates on one GPU.
"""
from __future__ import annotations

import argparse
import math

# Stated rates (H100 / H200 SXM): bf16 dense tensor-core peak 989 TFLOP/s, of which a fused
# attention-like kernel reaches ~50%; exponentials on the SFUs: 132 SMs x 16 ex2 / clock x 1.98
# GHz. Links: NVLink 4, 450 GB/s per direction per GPU; InfiniBand NDR, 400 Gb/s = 50 GB/s per GPU.
TENSOR_FLOPS = 0.5 * 989e12
EXP_RATE = 132 * 16 * 1.98e9
NVLINK = 450e9
INFINIBAND = 50e9
TILE = 64
BYTES = 2  # bf16 embeddings and gradients


def blocks_meeting(lo: int, count: int, span: int, paired: bool, tile: int) -> int:
    """How many row blocks of `tile` rows meet the local rows (i mod span in [lo, lo + count);
    paired: in both views' halves)."""
    if count <= 0:
        return 0
    ranges = [(lo, lo + count)] + ([(span + lo, span + lo + count)] if paired else [])
    hit = set()
    for a, b in ranges:
        hit.update(range(a // tile, (b - 1) // tile + 1))
    return len(hit)


def backward_tiles(m: int, lo: int, count: int, paired: bool, tile: int) -> tuple[int, int]:
    """(diagonal, off-diagonal) tiles I <= J of `tile` rows that meet the local rows: what the
    kernels' backward computes (csrc/nt_xent_cpu.cpp backward_rounds, the Triton and CUDA
    backwards' skip test): every diagonal tile of a meeting block, and every pair with at least
    one meeting block."""
    nb = math.ceil(m / tile)
    k = blocks_meeting(lo, count, m // 2 if paired else m, paired, tile)
    offdiag = nb * (nb - 1) // 2 - (nb - k) * (nb - k - 1) // 2
    return k, offdiag


def forward_tiles(m: int, count: int, paired: bool, row_tile: int, col_tile: int) -> int:
    """Forward (row block, column chunk) tiles of the local rows: blocks never straddle a view."""
    row_blocks = (2 if paired else 1) * math.ceil(count / row_tile)
    return row_blocks * math.ceil(m / min(col_tile, m))


def loss_work(design: str, world: int, batch: int, d: int) -> dict:
    """Per-rank FLOPs, exponentials, bytes sent per collective step, and peak loss memory."""
    m, rows = 2 * batch * world, 2 * batch
    mm = 2 * TILE * TILE * d  # one tile's matrix product
    if design == "replica":
        nb = math.ceil(m / TILE)
        diag, off = nb, nb * (nb - 1) // 2
        fwd_tiles = math.ceil(m / TILE) ** 2
    else:
        diag, off = backward_tiles(m, 0, batch, True, TILE)
        fwd_tiles = 2 * math.ceil(batch / TILE) * math.ceil(m / TILE)
    if design == "ring":  # each rank's rows against every column block, no symmetry: 3 products
        flops = fwd_tiles * mm + fwd_tiles * 3 * mm
        exps = fwd_tiles * TILE * TILE * 2
    else:
        flops = fwd_tiles * mm + diag * 2 * mm + off * 3 * mm
        exps = fwd_tiles * TILE * TILE + (diag + 2 * off) * TILE * TILE
    share = (world - 1) / world  # what a ring collective moves per rank, times the whole tensor
    z_bytes = m * d * BYTES
    gather = z_bytes * share
    back = {"local": z_bytes * share,  # reduce-scatter
            "replica": 2 * z_bytes * share,  # ring all-reduce = reduce-scatter + all-gather
            "ring": 2 * z_bytes * share}[design]  # columns again, and their gradients
    # memory: the gathered rows, their gradient and the fp32 accumulator (M x D each), or a
    # ring's two column blocks in flight and its own rows' accumulators
    mem = (m * d * (BYTES + BYTES + 4) if design != "ring"
           else 2 * rows * d * BYTES * 2 + rows * d * (BYTES + 4) * 2)
    return {"design": design, "W": world, "batch": batch, "M": m, "D": d, "flops": flops,
            "exps": exps, "gather_bytes": gather, "backward_bytes": back, "memory_bytes": mem}


def timings(row: dict) -> dict:
    link = NVLINK if row["W"] <= 8 else INFINIBAND
    compute = row["flops"] / TENSOR_FLOPS + row["exps"] / EXP_RATE
    comm = (row["gather_bytes"] + row["backward_bytes"]) / link
    step = max(compute, comm) if row["design"] == "ring" else compute + comm  # ring: overlapped
    return {**row, "link": "NVLink" if link == NVLINK else "InfiniBand", "compute_ms": 1e3 * compute,
            "comm_ms": 1e3 * comm, "loss_ms": 1e3 * step}


def table(rows: list) -> str:
    lines = ["| W | images / GPU | M | design | loss TFLOP / rank | exp (G) / rank | gathered + back (MB) "
             "| link | compute (ms) | comm (ms) | loss step (ms) | loss memory / rank (MB) |",
             "|---:|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['W']} | {r['batch']} | {r['M']} | {r['design']} | {r['flops'] / 1e12:.3f} | "
                     f"{r['exps'] / 1e9:.2f} | {(r['gather_bytes'] + r['backward_bytes']) / 1e6:.0f} | "
                     f"{r['link']} | {r['compute_ms']:.2f} | {r['comm_ms']:.2f} | {r['loss_ms']:.2f} | "
                     f"{r['memory_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[8, 64, 256, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[128, 512], help="images per GPU")
    p.add_argument("--dim", type=int, default=128)
    args = p.parse_args(argv)
    rows = [timings(loss_work(design, w, b, args.dim)) for w in args.worlds for b in args.batches
            for design in ("local", "replica", "ring")]
    print(f"Per-rank loss cost, D = {args.dim}, bf16; rates: {TENSOR_FLOPS / 1e12:.0f} TFLOP/s, "
          f"{EXP_RATE / 1e12:.1f} T exp/s, NVLink {NVLINK / 1e9:.0f} GB/s (W <= 8), InfiniBand "
          f"{INFINIBAND / 1e9:.0f} GB/s\n")
    print(table(rows))
    for b in args.batches:
        print(f"\nimages / GPU = {b}: " + "; ".join(
            f"W = {r['W']}: comm / compute = {r['comm_ms'] / r['compute_ms']:.1f}"
            for r in rows if r["batch"] == b and r["design"] == "local"))
    return rows


def break_even_batch(world: int, d: int) -> int:
    """The images per GPU at which the local design's compute time reaches its communication
    time: below it the collectives dominate (what a ring's overlap could hide)."""
    b = 1
    while b < 1 << 20:
        r = timings(loss_work("local", world, b, d))
        if r["compute_ms"] >= r["comm_ms"]:
            return b
        b *= 2
    return b


if __name__ == "__main__":
    main()
