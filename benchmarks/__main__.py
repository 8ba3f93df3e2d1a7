"""The whole comparison suite, fastclr against its peers, on this machine.

    python -m benchmarks                 # every part on the CPU, and on the GPU when there is one
    python -m benchmarks loss            # one part: loss | supcon | scale | lars | augment | folder | train | grad_cache | knn
    python -m benchmarks --device cpu    # only the CPU half (cuda: only the GPU half)

Each part is one of the benchmarks/bench_*.py scripts, run with the suite's settings below; each
writes its machine-readable results file to benchmarks/results/ (or --out-dir). Then
``python -m benchmarks.report`` turns every results file there into markdown tables and PNG plots
(benchmarks/report/) and refreshes docs/benchmarks.md's benchmark section. On the 2-core CPU dev machine
the CPU half takes about 11 minutes.
"""
from __future__ import annotations

import argparse
import importlib
import time

# part -> (module, CPU arguments, GPU arguments)
PARTS = {
    "loss": ("benchmarks.bench_loss",
             ["--sizes", "512", "2048", "8192", "16384", "--dims", "128", "--sweep-dims", "32", "512",
              "--sweep-m", "4096", "--repeats", "3", "--budget-mb", "1024", "--max-search-m", "65536",
              "--timeout", "600"],
             ["--sizes", "4096", "16384", "65536", "--dims", "128", "--sweep-dims", "64", "512",
              "--sweep-m", "16384", "--repeats", "10", "--budget-mb", "16384",
              "--impls", "triton", "cuda", "naive", "lightly", "pml", "infcl"]),
    "supcon": ("benchmarks.bench_loss",
               ["--loss", "supcon", "--labels", "classes:100", "--repeats", "3", "--timeout", "600"],
               ["--loss", "supcon", "--labels", "classes:100", "--sizes", "16384", "65536",
                "--repeats", "10"]),
    # one rank's share of the distributed loss, one thread per rank: CPU only (None: no GPU half)
    "scale": ("benchmarks.bench_scale", [], None),
    "lars": ("benchmarks.bench_lars", ["--repeats", "20"], ["--repeats", "50"]),
    "augment": ("benchmarks.bench_augment", [], []),
    # a folder of JPEG photos into two views: the loader workers' decode and crop (CPU)
    "folder": ("benchmarks.bench_folder", [], None),
    "train": ("benchmarks.bench_train", [], []),
    # ResNet-18 32 px batch 1024 / micro 128 on CPU; ResNet-50 224 px 4096 / 256 and the largest batches on GPU
    "grad_cache": ("benchmarks.bench_grad_cache", [], []),
    "knn": ("benchmarks.bench_knn", [], []),
}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", choices=[*PARTS, []], help="default: all")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU half, then the GPU half when a GPU is visible")
    p.add_argument("--out-dir", help="results files here instead of benchmarks/results")
    p.add_argument("--no-report", action="store_true", help="do not run benchmarks.report after")
    args = p.parse_args(argv)
    import torch
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
               "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible")
    parts = args.parts or list(PARTS)
    extra = ["--out-dir", args.out_dir] if args.out_dir else []
    start = time.perf_counter()
    for device in devices:
        for part in parts:
            module, cpu_args, gpu_args = PARTS[part]
            if device == "cuda" and gpu_args is None:
                continue
            device_arg = ["--device", device] if gpu_args is not None else []
            argv_part = [*device_arg, *(gpu_args if device == "cuda" else cpu_args), *extra]
            print(f"\n== {part} on {device}: python -m {module} {' '.join(argv_part)}", flush=True)
            t0 = time.perf_counter()
            importlib.import_module(module).main(argv_part)
            print(f"== {part} on {device}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"\n== suite: {time.perf_counter() - start:.0f} s", flush=True)
    if not args.no_report:
        from benchmarks import report
        report.main(["--results", args.out_dir] if args.out_dir else [])


if __name__ == "__main__":
    main()
