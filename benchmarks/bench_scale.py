"""Per-rank cost of the distributed loss: one rank's forward+backward at W = 1, 2, 4 ranks.

    python -m benchmarks.bench_scale                      # M = 16384, D = 128, NT-Xent and SupCon
    python -m benchmarks.bench_scale --sizes 4096 --worlds 1 2 4 8 --repeats 3

Under ``process_group`` each rank computes the loss of its own M / W rows against all M gathered
rows (the kernels' local-rows mode) and the backward of exactly those, for all M rows; W = 1 is
the single-process loss of the whole batch (and what every rank computed before local rows: a
full replica). Rank 0 of W is timed in its own process pinned to one thread, so that the count
is honest on a small machine (on 2 cores, two ranks timed at once would share them); the
collectives (an all-gather of M x D, a reduce-scatter of M x D) are not in the timing:
benchmarks/scale_model.py puts numbers on them. Times are medians over --repeats after a warm-up.
The ideal is 1/W (all work split evenly, nothing shared); the symmetric backward tiles, which a
rank shares with the other ranks' rows, keep the real ratio above it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks import common

LOSSES = {"ntxent": "NT-Xent (paired positives)", "supcon": "SupCon, 100 classes (mean positives)"}

SNIPPET = """
import json, sys, torch
torch.set_num_threads(1)
import fastclr
from benchmarks import common
loss, m, d, world, repeats = {loss!r}, {m}, {d}, {world}, {repeats}
torch.manual_seed(0)
if loss == "ntxent":
    z1 = torch.randn(m // 2, d, requires_grad=True)
    z2 = torch.randn(m // 2, d, requires_grad=True)
    labels, span, leaves = None, m // 2, (z1, z2)
else:
    z1 = torch.randn(m, d, requires_grad=True)
    z2 = None  # labels mode: every row in z1
    labels, span, leaves = torch.randint(0, 100, (m,)), m, (z1,)
t = torch.tensor(0.2)
count = span // world
def step():
    for x in leaves:
        x.grad = None
    rows = torch.ops.fastclr.nt_xent_forward(z1, z2, t, labels=labels, mean_positives=loss == "supcon",
                                             row_count=count)[0]
    rows.sum().backward()
seconds, times = common.median_time(step, repeats)
print(json.dumps({{"seconds": seconds, "times": times}}))
"""


def run_rank(loss: str, m: int, d: int, world: int, repeats: int, timeout: float) -> dict:
    code = SNIPPET.format(loss=loss, m=m, d=d, world=world, repeats=repeats)
    row = {"loss": loss, "M": m, "D": d, "W": world, "rows_per_rank": m // world}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=timeout, check=True, cwd=common.RESULTS_DIR.parent.parent)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout"}
    except subprocess.CalledProcessError as exc:
        return {**row, "status": "error", "error": (exc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {**row, "status": "ok", "rank_s": got["seconds"], "rank_times": got["times"]}


def table(rows: list) -> str:
    """Markdown: per loss and W, rank 0's forward+backward, its ratio to W = 1, the ideal."""
    ok = [r for r in rows if r.get("status") == "ok"]
    single = {(r["loss"], r["M"], r["D"]): r["rank_s"] for r in ok if r["W"] == 1}
    lines = ["| loss | M | D | W | rows per rank | one rank's fwd+bwd (s) | vs W = 1 | ideal (1/W) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['loss']} | {r['M']} | {r['D']} | {r['W']} | {r['rows_per_rank']} | "
                         f"{r.get('status')} | | |")
            continue
        base = single.get((r["loss"], r["M"], r["D"]))
        ratio = f"{r['rank_s'] / base:.2f}x" if base else ""
        lines.append(f"| {r['loss']} | {r['M']} | {r['D']} | {r['W']} | {r['rows_per_rank']} | "
                     f"{r['rank_s']:.3f} | {ratio} | {1 / r['W']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16384], help="global M (even)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--losses", nargs="+", choices=sorted(LOSSES), default=["ntxent", "supcon"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    common.add_output_args(p)
    args = p.parse_args(argv)
    for m in args.sizes:
        for w in args.worlds:
            if m % 2 or w < 1 or (m // 2) % w:
                p.error(f"M = {m} must be even with M / 2 divisible by W = {w}")
    from tqdm import tqdm

    configs = [(loss, m, w) for loss in args.losses for m in args.sizes for w in args.worlds]
    rows = [run_rank(loss, m, args.dim, w, args.repeats, args.timeout)
            for loss, m, w in tqdm(configs, desc="bench_scale", unit="config")]
    meta = {"machine": {**common.machine("cpu"), "torch_threads": 1},
            "versions": common.versions("torch", "fastclr"), "losses": {k: LOSSES[k] for k in args.losses}}
    common.publish("scale", "benchmarks.bench_scale",
                   f"One rank's loss forward+backward at W ranks (its M / W rows against all M), "
                   f"float32, {common.where(meta)}", table(rows), rows, meta, args, argv)


if __name__ == "__main__":
    main()
