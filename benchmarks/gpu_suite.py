"""Every GPU check and benchmark of fastclr, in one command for any machine with a CUDA GPU.

    bash benchmarks/gpu_suite.sh [OUT_DIR] [--budget SECONDS] [--wheels DIR]
    bash benchmarks/gpu_suite.sh --plan         # anywhere: the stages, estimates, budget, files

The stages run in order of value and share one time budget (``--budget``, or GPU_SUITE_BUDGET_S;
default 550 s, counted from the suite's start), so that a short session on a GPU yields the most
important results first. A stage starts only when the time left covers its estimate; otherwise
it is recorded as skipped, with the reason. A running stage is stopped at its cap or when the
budget runs out, whichever comes first. Everything a stage writes lands in a scratch folder; at
the end OUT_DIR (default benchmarks/results/gpu-<date>) receives a handful of files, easy to copy
off a remote machine: summary.md (every stage: ran / skipped / failed, its seconds, its table),
results.tar.gz (every log, results file and training output) and the results files that
``python -m benchmarks.report`` reads. ``python -m benchmarks.import_results OUT_DIR`` files them
into benchmarks/results/ and regenerates docs/benchmarks.md.

On a machine without internet, the peers it compares against come as wheels in a folder
(``--wheels DIR``, default .whl/; benchmarks/fetch_gpu_wheels.sh downloads them elsewhere); they
are installed into a scratch folder first. Exit status: 0 when every stage that ran passed,
1 when one failed, 2 when no CUDA GPU is visible.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FILES = 8  # the output folder stays a handful of files, easy to copy off a remote machine
DEFAULT_BUDGET_S = 550
# the plan's estimates must fit in this, whatever the budget says: the whole default suite is
# meant to end within 10 minutes of the machine's time, set-up included
PLAN_LIMIT_S = 560
RESERVE_S = 10  # packing the results at the end
PY = os.environ.get("PYTHON", "python3")


@dataclass
class Stage:
    """One step of the suite: commands run in order, a stage fails at its first failing one.

    ``estimate`` (s) decides whether it starts; ``cap`` (s) stops it when it runs long.
    ``results`` are the results-file kinds it writes (each comes back as its own file)."""
    name: str
    what: str
    estimate: int
    cap: int
    commands: list = field(default_factory=list)
    results: tuple = ()


def _bench(module: str, *args: str) -> list:
    return [PY, "-m", module, "--device", "cuda", "--out-dir", "{work}", *args]


def _pytest_timeout() -> list:
    import importlib.util
    return ["--timeout", "120"] if importlib.util.find_spec("pytest_timeout") else []


def stages() -> list:
    """The suite, in order of value (issue 14)."""
    pytest = [PY, "-m", "pytest", "tests", "-m", "cuda", "-x", "-q", "-rs", "-p", "no:cacheprovider",
              *_pytest_timeout()]
    sanitize = [[shutil.which("compute-sanitizer") or "compute-sanitizer", "--tool", tool,
                 "--error-exitcode", "9", PY, "benchmarks/sanitize_case.py"]
                for tool in ("memcheck", "racecheck")]
    train = [PY, "-m", "fastclr.train", "--no-progress", "--eval-random-init", "--out", "{work}/train-digits"]
    return [
        Stage("build", "the extension, CUDA sources for this GPU's arch only", 110, 300,
              [[PY, "setup.py", "build_ext", "--inplace"]]),
        Stage("tests", "every test marked cuda against float64 (-x, per-test timeout)", 100, 200,
              [pytest]),
        Stage("loss", "headline loss: bf16, D=128, M=16384/65536/262144, Triton/CUDA vs peers", 80, 150,
              [_bench("benchmarks.bench_loss", "--sizes", "16384", "65536", "262144", "--dims", "128",
                      "--dtype", "bf16", "--repeats", "10", "--timeout", "60",
                      "--impls", "triton", "cuda", "naive", "lightly", "infcl")],
              results=("loss",)),
        Stage("supcon", "SupCon (100 classes): bf16, D=128, M=65536, Triton/CUDA vs naive", 20, 60,
              [_bench("benchmarks.bench_loss", "--loss", "supcon", "--labels", "classes:100",
                      "--sizes", "65536", "--dims", "128", "--dtype", "bf16", "--repeats", "5",
                      "--timeout", "40", "--impls", "triton", "cuda", "naive")],
              results=("supcon",)),
        Stage("lars-knn", "LARS on ResNet-50's parameters; knn_topk 20000 x 200000", 40, 90,
              [_bench("benchmarks.bench_lars", "--models", "resnet50", "--repeats", "50"),
               _bench("benchmarks.bench_knn", "--queries", "20000", "--bank", "200000",
                      "--repeats", "3")],
              results=("lars", "knn")),
        Stage("train-step", "end-to-end step, ResNet-50 224 px bf16, one swap at a time, vs bare encoder",
              50, 120, [_bench("benchmarks.bench_train", "--models", "resnet50", "--batches", "256",
                               "--steps", "5")], results=("train",)),
        Stage("sanitize", "compute-sanitizer memcheck and racecheck, small case", 25, 60, sanitize),
        Stage("grad-cache", "ResNet-50 224 px bf16: batch 4096 in micro-batches of 256 vs plain 256; "
              "largest batch plain / cached", 80, 150,
              [_bench("benchmarks.bench_grad_cache", "--repeats", "2", "--timeout", "60")],
              results=("grad_cache",)),
        Stage("train-digits", "the digits default training run on the GPU", 35, 120, [train]),
    ]


def returned_files(plan: list) -> list:
    kinds = [k for s in plan for k in s.results]
    return ["summary.md", "results.tar.gz"] + [f"{k}-cuda-<date>.json" for k in kinds]


def budget(given=None) -> int:
    """The time budget in seconds: --budget, else GPU_SUITE_BUDGET_S, else the default."""
    raw = str(given) if given is not None else os.environ.get("GPU_SUITE_BUDGET_S", str(DEFAULT_BUDGET_S))
    try:
        value = int(raw)
    except ValueError:
        sys.exit(f"the budget (--budget / GPU_SUITE_BUDGET_S) must be a whole number of seconds, got {raw!r}")
    if value <= 0:
        sys.exit(f"the budget (--budget / GPU_SUITE_BUDGET_S) must be > 0, got {value}")
    return value


def show_plan(plan: list, total: int) -> int:
    """Prints the plan; 0 when it fits (estimates within the budget and PLAN_LIMIT_S, files
    within MAX_FILES), 1 otherwise."""
    est = sum(s.estimate for s in plan) + RESERVE_S
    files = returned_files(plan)
    print(f"GPU suite plan: budget {total} s (GPU_SUITE_BUDGET_S), {len(plan)} stages in order of value\n")
    print("| # | stage | estimate (s) | cap (s) | what |\n|---:|---|---:|---:|---|")
    for i, s in enumerate(plan, 1):
        print(f"| {i} | {s.name} | {s.estimate} | {s.cap} | {s.what} |")
    print(f"\ntotal estimate: {est} s (stages + {RESERVE_S} s packing); "
          f"limit: {min(total, PLAN_LIMIT_S)} s")
    print(f"files that come back ({len(files)} of at most {MAX_FILES}): {', '.join(files)}")
    problems = []
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files come back, more than {MAX_FILES}")
    if est > total:
        problems.append(f"estimates ({est} s) exceed the budget ({total} s)")
    if est > PLAN_LIMIT_S:
        problems.append(f"estimates ({est} s) exceed {PLAN_LIMIT_S} s")
    for p in problems:
        print(f"plan does not fit: {p}")
    return 1 if problems else 0


def run_command(cmd: list, log, timeout: float, env: dict) -> tuple:
    """Runs cmd in its own process group, its output to log and to stdout; kills the whole
    group at timeout. Returns (exit code or None when killed, seconds)."""
    t0 = time.monotonic()
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)
    except OSError as exc:  # compute-sanitizer missing, say
        log.write(f"cannot start: {exc}\n")
        return 127, time.monotonic() - t0
    killed = threading.Event()

    def kill():
        killed.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    timer = threading.Timer(max(timeout, 0.0), kill)
    timer.start()
    try:
        for line in proc.stdout:
            line = line.replace("\r", "\n")
            log.write(line)
            sys.stdout.write(line)
        proc.wait()
    finally:
        timer.cancel()
    seconds = time.monotonic() - t0
    if killed.is_set():
        log.write(f"\n[stopped after {seconds:.0f} s: over its time limit]\n")
        return None, seconds
    return proc.returncode, seconds


def tables_of(text: str) -> str:
    """The markdown tables a benchmark printed (with the title line above each), or a test
    run's closing lines."""
    lines = text.splitlines()
    keep, prev = [], ""
    for i, line in enumerate(lines):
        if line.startswith("|"):
            if not (keep and keep[-1].startswith("|")) and prev.strip():
                keep += ["", prev.strip(), ""]
            keep.append(line)
        elif keep and keep[-1].startswith("|"):
            keep.append("")
        if line.strip():
            prev = line
    if keep:
        return "\n".join(keep).strip()
    closing = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "SKIPPED", "=")) or " passed" in ln
               or " failed" in ln or "error" in ln.lower()]
    return "\n".join((closing or lines)[-25:])


def record_environment(work: Path, env: dict) -> tuple:
    """nvidia-smi and versions to env.txt; sets the build's arch and jobs. Returns (text, gpu?)."""
    probe = ("import importlib.metadata as md, os, platform, torch\n"
             "print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda)\n"
             "for n in ('triton', 'lightly', 'inf-cl', 'pytorch-metric-learning', 'faiss-cpu', 'nvidia-dali-cuda130', 'pytest-timeout'):\n"
             "    try: print(n, md.version(n))\n"
             "    except md.PackageNotFoundError: print(n, 'missing')\n"
             "print('cores', os.cpu_count())\n"
             "if torch.cuda.is_available():\n"
             "    print('gpu', torch.cuda.get_device_name(), 'arch %d.%d' % torch.cuda.get_device_capability())\n")
    out = [dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")]
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi], capture_output=True, text=True)
        out.append(r.stdout.strip())
    r = subprocess.run([PY, "-c", probe], capture_output=True, text=True, env=env)
    out.append((r.stdout + r.stderr).strip())
    text = "\n".join(out)
    gpu = next((ln for ln in text.splitlines() if ln.startswith("gpu ")), None)
    if gpu:
        env["TORCH_CUDA_ARCH_LIST"] = gpu.rsplit("arch ", 1)[1]
    env["MAX_JOBS"] = str(os.cpu_count() or 1)
    (work / "env.txt").write_text(text + "\n")
    return text, gpu is not None


def install_wheels(work: Path, env: dict, folder: Path = ROOT / ".whl") -> str:
    """The peers' wheels in ``folder``, installed into a scratch folder put first on PYTHONPATH."""
    wheels = sorted(Path(folder).glob("*.whl"))
    if not wheels:
        return f"no wheels in {folder}: peers missing on the machine read 'missing'"
    site = work / "site"
    r = subprocess.run([PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                       capture_output=True, text=True)
    if r.returncode:
        return f"wheel install failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return f"installed {len(wheels)} wheels from {folder}: {', '.join(w.name.split('-')[0] for w in wheels)}"


def run_stage(stage: Stage, work: Path, env: dict, deadline: float) -> dict:
    log_path = work / f"{stage.name}.log"
    status, seconds, reason = "passed", 0.0, ""
    with open(log_path, "w") as log:
        for cmd in stage.commands:
            cmd = [c.replace("{work}", str(work)) for c in cmd]
            left = min(stage.cap - seconds, deadline - time.monotonic())
            rc, took = run_command(cmd, log, left, env)
            seconds += took
            if rc is None:
                status, reason = "failed", f"stopped at its time limit ({left:.0f} s)"
                break
            if rc:
                status, reason = "failed", f"exit {rc}: {Path(cmd[0]).name} {' '.join(cmd[1:4])}"
                break
    return {"name": stage.name, "status": status, "seconds": seconds, "reason": reason,
            "table": tables_of(log_path.read_text(errors="replace"))}


def write_summary(path: Path, env_text: str, notes: list, records: list, total: int, spent: float) -> None:
    lines = [f"# fastclr GPU suite, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"budget {total} s, spent {spent:.0f} s", "", "| stage | status | seconds | note |",
             "|---|---|---:|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.0f} | {r['reason']} |" for r in records]
    lines += ["", "## Environment", "", "```", env_text, *notes, "```"]
    for r in records:
        if r.get("table"):
            lines += ["", f"## {r['name']} ({r['status']})", "", r["table"]]
    path.write_text("\n".join(lines) + "\n")


def pack(work: Path, out: Path, plan: list) -> list:
    """results.tar.gz of the scratch folder (checkpoints and the wheel site left out) and the
    newest results file of each kind, beside summary.md. Returns the files in out."""
    def keep(info):
        name = info.name
        if name.startswith("./site") or name.endswith((".pt", ".pth")):
            return None
        return info
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        tar.add(work, arcname=".", filter=keep)
    for kind in dict.fromkeys(k for s in plan for k in s.results):
        found = sorted(work.glob(f"{kind}-cuda-*.json"))
        if found:
            shutil.copy2(found[-1], out / found[-1].name)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bash benchmarks/gpu_suite.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="store_true", help="print the plan and check that it fits; run nothing")
    p.add_argument("out", nargs="?", help="output folder (default: benchmarks/results/gpu-<date>)")
    p.add_argument("--budget", type=int, help=f"time budget in seconds (default: GPU_SUITE_BUDGET_S, "
                                              f"else {DEFAULT_BUDGET_S})")
    p.add_argument("--wheels", default=str(ROOT / ".whl"),
                   help="a folder of peer wheels to install first, for machines without internet (default: .whl/)")
    args = p.parse_args(argv)
    total, plan = budget(args.budget), stages()
    if args.plan:
        return show_plan(plan, total)
    start = time.monotonic()
    deadline = start + total - RESERVE_S
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        sys.exit(f"output folder {out} is not empty: give an empty or new folder")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    work = Path(tempfile.mkdtemp(prefix="fastclr-gpu-suite-"))
    notes = [install_wheels(work, env, Path(args.wheels))]
    env_text, gpu = record_environment(work, env)
    print(env_text, *notes, sep="\n", flush=True)
    records = []
    for stage in plan:
        left = deadline - time.monotonic()
        print(f"\n== {stage.name}: {stage.what} (estimate {stage.estimate} s, {left:.0f} s left)", flush=True)
        if not gpu:
            records.append({"name": stage.name, "status": "skipped", "seconds": 0, "reason": "no CUDA GPU visible"})
        elif left < stage.estimate:
            records.append({"name": stage.name, "status": "skipped", "seconds": 0,
                            "reason": f"needs ~{stage.estimate} s, {max(left, 0):.0f} s left"})
        else:
            records.append(run_stage(stage, work, env, deadline))
        print(f"== {stage.name}: {records[-1]['status']} {records[-1]['reason']}", flush=True)
    write_summary(work / "summary.md", env_text, notes, records, total, time.monotonic() - start)
    shutil.copy2(work / "summary.md", out / "summary.md")
    files = pack(work, out, plan)
    print((work / "summary.md").read_text())
    print(f"files in {out}: {', '.join(files)}")
    shutil.rmtree(work, ignore_errors=True)
    if not gpu:
        return 2
    return 1 if any(r["status"] == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
