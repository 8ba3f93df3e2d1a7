"""benchmarks/gpu_suite.sh: the plan fits its time limit, and the budget / skip / packing logic
works (on CPU, with stand-in stages)."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import gpu_suite

ROOT = Path(__file__).resolve().parent.parent
SUITE = ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")]


def _plan(budget=None):
    env = dict(os.environ, PYTHON=sys.executable)
    if budget is not None:
        env["GPU_SUITE_BUDGET_S"] = str(budget)
    return subprocess.run(SUITE + ["--plan"], capture_output=True, text=True, env=env, cwd="/")


def test_plan_fits_its_time_limit():
    r = _plan()
    assert r.returncode == 0, r.stdout + r.stderr
    total = int(r.stdout.split("total estimate: ", 1)[1].split(" s", 1)[0])
    assert total <= gpu_suite.PLAN_LIMIT_S <= 570 and total <= gpu_suite.DEFAULT_BUDGET_S
    files = r.stdout.split("files that come back (", 1)[1]
    assert int(files.split(" of", 1)[0]) <= 8
    for name in ("build", "tests", "loss", "lars-knn", "train-step", "sanitize", "grad-cache", "train-digits"):
        assert f"| {name} |" in r.stdout
    assert "summary.md" in files and "results.tar.gz" in files and "loss-cuda-<date>.json" in files


def test_plan_that_cannot_fit_exits_nonzero():
    r = _plan(budget=100)
    assert r.returncode == 1 and "exceed the budget" in r.stdout
    r = _plan(budget="soon")
    assert r.returncode != 0 and "GPU_SUITE_BUDGET_S" in r.stderr


def test_without_a_gpu_every_stage_is_skipped_and_the_files_come_back(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    r = subprocess.run(SUITE + [str(tmp_path / "out")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    for stage in gpu_suite.stages():
        assert f"| {stage.name} | skipped | 0 | no CUDA GPU visible |" in summary
    assert "torch" in summary  # the environment record
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["results.tar.gz", "summary.md"]


def test_budget_skips_caps_and_packs(tmp_path, monkeypatch):
    """Stand-in stages: one passes and writes a results file, one is over the time left (skipped),
    one outruns its cap (stopped, failed), one fails; at most 8 files come back."""
    py = sys.executable
    write = ("import json, sys; json.dump({'kind': 'loss', 'rows': []}, "
             "open(sys.argv[1] + '/loss-cuda-20260101-000000.json', 'w')); "
             "print('Loss title'); print('| a | b |'); print('|---|---|'); print('| 1 | 2 |')")
    plan = [gpu_suite.Stage("first", "writes a results file", 1, 30,
                            [[py, "-c", write, "{work}"]], results=("loss",)),
            gpu_suite.Stage("huge", "needs more than the budget", 10_000, 10, [[py, "-c", "pass"]]),
            gpu_suite.Stage("slow", "outruns its cap", 1, 2, [[py, "-c", "import time; time.sleep(60)"]]),
            gpu_suite.Stage("broken", "fails", 1, 30, [[py, "-c", "raise SystemExit(3)"]],
                            results=("lars",))]
    monkeypatch.setattr(gpu_suite, "stages", lambda: plan)
    monkeypatch.setattr(gpu_suite, "record_environment", lambda work, env: ("gpu stand-in", True))
    monkeypatch.setattr(gpu_suite, "install_wheels", lambda work, env, folder: "no wheels")
    monkeypatch.setenv("GPU_SUITE_BUDGET_S", "60")
    out = tmp_path / "out"
    assert gpu_suite.main([str(out)]) == 1
    summary = (out / "summary.md").read_text()
    assert "| first | passed |" in summary
    assert "| huge | skipped | 0 | needs ~10000 s," in summary
    assert "| slow | failed |" in summary and "stopped at its time limit" in summary
    assert "| broken | failed |" in summary and "exit 3" in summary
    assert "Loss title\n\n| a | b |" in summary  # the stage's table, with its title
    files = sorted(p.name for p in out.iterdir())
    assert files == ["loss-cuda-20260101-000000.json", "results.tar.gz", "summary.md"]
    assert json.loads((out / files[0]).read_text())["kind"] == "loss"
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert {"./first.log", "./slow.log", "./summary.md"} <= set(names)


def test_output_folder_must_be_empty(tmp_path, monkeypatch):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit, match="not empty"):
        gpu_suite.main([str(tmp_path)])


def test_import_results_files_a_run(tmp_path, monkeypatch):
    """python -m benchmarks.import_results: a run's folder -> results files beside the others, the
    summary and logs in a gpu-<date> folder; a folder without summary.md is refused."""
    from benchmarks import import_results
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.md").write_text("# fastclr GPU suite\n")
    rows = [{"impl": i, "dtype": "bf16", "M": 16384, "D": 128, "fwd_bwd_s": t, "status": "ok"}
            for i, t in (("triton", 0.02), ("cuda", 0.01))]
    (run / "loss-cuda-20260101-000000.json").write_text(json.dumps({"kind": "loss", "rows": rows}))
    work = tmp_path / "work"
    work.mkdir()
    (work / "loss.log").write_text("log\n")
    with tarfile.open(run / "results.tar.gz", "w:gz") as tar:
        tar.add(work, arcname=".")
    results = tmp_path / "results"
    results.mkdir()
    dest = import_results.file_results(run, results)
    assert (dest / "summary.md").is_file() and (dest / "loss.log").is_file()
    assert (results / "loss-cuda-20260101-000000.json").is_file()
    lines = import_results.triton_vs_cuda(results)
    assert "bf16 M=16384 D=128: triton 0.0200 s, cuda 0.0100 s -> cuda faster (2.00x)" in "\n".join(lines)
    with pytest.raises(SystemExit, match="not a GPU suite's output folder"):
        import_results.file_results(work, results)


def test_budget_option_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("GPU_SUITE_BUDGET_S", "300")
    assert gpu_suite.budget() == 300 and gpu_suite.budget(120) == 120
    with pytest.raises(SystemExit, match="must be > 0"):
        gpu_suite.budget(0)
