"""What ``import fastclr`` costs on top of ``import torch``, in one run.

    python -m benchmarks.bench_import [--rounds 7]

Each round starts fresh interpreters for ``import torch``, ``import fastclr`` and
``python -m fastclr.train --help``, alternating, and times them (wall clock, start to exit); the
medians over rounds are printed with the differences, and whether ``triton`` was imported
(the dispatcher imports it on first use of a Triton backend, never at ``import fastclr``).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "import torch": ["-c", "import torch"],
    "import fastclr": ["-c", "import fastclr, sys; assert 'triton' not in sys.modules, 'triton imported'"],
    "python -m fastclr.train --help": ["-m", "fastclr.train", "--help"],
}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_import", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    times = {k: [] for k in COMMANDS}
    for _ in range(args.rounds):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *cmd], check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["import torch"])
    print(f"| command | median (s) over {args.rounds} rounds | over import torch (s) |\n|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| `{name}` | {med:.2f} | {med - base:+.2f} |")


if __name__ == "__main__":
    main()
