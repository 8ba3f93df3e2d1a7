"""A GPU suite run's output folder -> benchmarks/results/, docs/benchmarks.md regenerated.

    python -m benchmarks.import_results OUT_DIR [--commit]

The results files (``*-cuda-*.json``) go to benchmarks/results/, where ``python -m
benchmarks.report`` reads them; summary.md and the unpacked logs of results.tar.gz go to
benchmarks/results/gpu-<date>/. Then the report is regenerated and the Triton-vs-CUDA comparison
printed, from which ``OPS[op].cuda_faster`` (fastclr/_dispatch.py) is filled. ``--commit`` makes
one git commit of it all.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def file_results(src: Path, results: Path = RESULTS) -> Path:
    """Copies a run's files into ``results``; returns the run's own folder there."""
    summary = src / "summary.md"
    if not summary.is_file():
        raise SystemExit(f"{summary} not found: {src} is not a GPU suite's output folder")
    stamp = dt.datetime.fromtimestamp(summary.stat().st_mtime, dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    dest = results / f"gpu-{stamp}"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(summary, dest / "summary.md")
    archive = src / "results.tar.gz"
    if archive.is_file():  # logs and training outputs; the results files come as their own files
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if not m.name.endswith(".json") or "-cuda-" not in m.name]
            tar.extractall(dest, members=members, filter="data")
    for f in sorted(src.glob("*-cuda-*.json")):
        shutil.copy2(f, results / f.name)
    return dest


def triton_vs_cuda(results: Path = RESULTS) -> list:
    """Lines comparing Triton and CUDA forward+backward times of the newest loss results."""
    files = sorted(results.glob("loss-cuda-*.json"))
    if not files:
        return []
    rows = [r for r in json.loads(files[-1].read_text())["rows"] if r.get("status") == "ok"]
    by = {(r["impl"], r["dtype"], r["M"], r["D"]): r["fwd_bwd_s"] for r in rows if "fwd_bwd_s" in r}
    lines = [f"Triton vs CUDA, forward+backward, {files[-1].name}:"]
    for (impl, dtype, m, d), t in sorted(by.items()):
        if impl == "cuda" and ("triton", dtype, m, d) in by:
            tri = by[("triton", dtype, m, d)]
            lines.append(f"  {dtype} M={m} D={d}: triton {tri:.4f} s, cuda {t:.4f} s -> "
                         f"{'cuda' if t < tri else 'triton'} faster ({tri / t:.2f}x)")
    lines.append("fill OPS['nt_xent_fused'].cuda_faster in fastclr/_dispatch.py from these lines")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.import_results", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="the GPU suite's output folder")
    p.add_argument("--commit", action="store_true", help="commit the results and the regenerated docs")
    args = p.parse_args(argv)
    dest = file_results(args.src)
    print(f"filed under {dest.relative_to(ROOT)} and benchmarks/results/")
    from benchmarks import report
    report.main([])
    print("\n".join(triton_vs_cuda()))
    if args.commit:
        subprocess.run(["git", "add", "benchmarks/results", "docs/benchmarks.md", "benchmarks/report"],
                       cwd=ROOT, check=True)
        message = f"GPU suite results of {dest.name} (python -m benchmarks.import_results)"
        subprocess.run(["git", "commit", "-q", "-m", message], cwd=ROOT, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
