"""Old kernel against new, in one run: NT-Xent forward+backward of two checkouts, interleaved.

    git worktree add /tmp/old <rev> && (cd /tmp/old && python setup.py build_ext --inplace)
    python -m benchmarks.ab_loss /tmp/old . --sizes 4096 16384 --rounds 5

Both checkouts cannot be loaded into one process (their ops share the ``fastclr`` namespace), so
each round runs one process per checkout, alternating, each timing ``--repeats`` forward+backward
passes after a warm-up; the medians over rounds are compared, so drifting machine load hits both
alike. Prints a markdown table: median seconds of each and new / old.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

SNIPPET = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
import fastclr
torch.manual_seed(0)
m, d, repeats, impl, dtype = {m}, {d}, {repeats}, {impl!r}, getattr(torch, {dtype!r})
z1 = torch.randn(m // 2, d, dtype=dtype, requires_grad=True)
z2 = (z1.detach() + 0.5 * torch.randn(m // 2, d, dtype=dtype)).requires_grad_()
def step():
    z1.grad = z2.grad = None
    fastclr.nt_xent_fused(z1, z2, 0.2, impl=impl).backward()
step()
times = []
for _ in range(repeats):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
print(json.dumps(sorted(times)[len(times) // 2]))
"""


def run(root: Path, m: int, d: int, repeats: int, impl: str, dtype: str) -> float:
    code = SNIPPET.format(root=str(root.resolve()), m=m, d=d, repeats=repeats, impl=impl, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.ab_loss", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384], help="M = 2N")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--impl", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    print("| M | D | old fwd+bwd (s) | new fwd+bwd (s) | new / old |\n|---:|---:|---:|---:|---:|")
    for m in args.sizes:
        times = {"old": [], "new": []}
        for _ in range(args.rounds):
            for name in ("old", "new"):
                times[name].append(run(getattr(args, name), m, args.dim, args.repeats, args.impl,
                                       args.dtype))
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        print(f"| {m} | {args.dim} | {old:.4f} | {new:.4f} | {new / old:.3f} |", flush=True)


if __name__ == "__main__":
    main()
