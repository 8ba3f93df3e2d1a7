"""Shared pieces of the benchmarks: machine description, results files, memory probes."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(*packages: str) -> dict:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine(device: str = "cpu") -> dict:
    import torch
    info = {"host": platform.node(), "os": platform.platform(), "cpu": cpu_model(),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def where(meta: dict) -> str:
    """The hardware a results file's rows came from, in words: the GPU, or the CPU and threads."""
    m = meta["machine"]
    return m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} threads"


def write_results(kind: str, module: str, rows: list, meta: dict, out_dir=None, argv=None) -> Path:
    """<out_dir or benchmarks/results>/<kind>-<device>-<date>.json, with the command that
    reproduces it (``argv``: the module's arguments, when it was not run from the shell)."""
    folder = Path(out_dir) if out_dir else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    path = folder / f"{kind}-{meta['machine']['device']}-{now:%Y%m%d-%H%M%S}.json"
    args = [a for a in (sys.argv[1:] if argv is None else argv)]
    if "--out-dir" in args:  # where the file went is not part of how to reproduce it
        i = args.index("--out-dir")
        del args[i:i + 2]
    command = " ".join(["python", "-m", module, *args])
    payload = {"kind": kind, "date": now.isoformat(timespec="seconds"), "command": command,
               **meta, "rows": rows}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def add_output_args(parser) -> None:
    """--out-dir and --no-save, as every benchmark script takes them."""
    parser.add_argument("--out-dir", help="write the results file here instead of benchmarks/results")
    parser.add_argument("--no-save", action="store_true", help="print only, write no results file")


def publish(kind: str, module: str, title: str, table: str, rows: list, meta: dict, args, argv) -> None:
    """Prints a benchmark's title and markdown table, then writes its results file (unless
    --no-save) and says where."""
    print(f"\n{title}\n")
    print(table)
    if not args.no_save:
        print(f"\nresults: {write_results(kind, module, rows, meta, args.out_dir, argv)}")


def rss_bytes(field: str = "VmRSS:") -> int:
    """Resident memory (VmRSS) or its high-water mark (VmHWM) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Resets VmHWM to the current RSS (Linux >= 4.0), so a peak can be measured from here."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_extra_mb(device: str, fn) -> tuple:
    """(MiB, fn's result): the memory fn needs beyond what is held when it starts. CPU: the rise
    of the process's resident high-water mark (reset just before); GPU: max_memory_allocated
    minus memory_allocated before it."""
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, out
    base = rss_bytes()
    reset_peak_rss()
    out = fn()
    return (rss_bytes("VmHWM:") - base) / 2**20, out


def cuda_median_time(fn, repeats: int, warmup: int = 2) -> tuple[float, list]:
    """Median seconds of fn on the current CUDA stream, timed with CUDA events."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), times


def median_time(fn, repeats: int, warmup: int = 1) -> tuple[float, list]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times
