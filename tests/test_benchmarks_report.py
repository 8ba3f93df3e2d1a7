"""benchmarks.report: results files of every kind -> tables, plots and the README section."""
import json

from benchmarks import common, report


def _write(folder, kind, date, rows, **extra):
    meta = {"machine": {"cpu": "Test CPU", "torch_threads": 2, "device": "cpu"},
            "versions": {"torch": "9.9"}, **extra}
    payload = {"kind": kind, "date": date, "command": f"python -m benchmarks.bench_{kind}", **meta,
               "rows": rows}
    tag = extra.get("labels", "").replace(":", "")
    (folder / f"{kind}-cpu-{date[:10]}{tag}.json").write_text(json.dumps(payload))


def test_report_sections_plots_and_readme(tmp_path):
    res = tmp_path / "results"
    (res / "old").mkdir(parents=True)
    loss = lambda impl, m, t, mem: {"impl": impl, "M": m, "D": 128, "status": "ok", "fwd_s": t / 3,  # noqa: E731
                                    "fwd_bwd_s": t, "peak_extra_mb": mem, "device": "cpu"}
    _write(res / "old", "loss", "2026-01-01T00:00:00", [loss("fused", 1024, 9.0, 1)])
    _write(res, "loss", "2026-02-01T00:00:00", [
        loss("fused", 1024, 0.01, 2), loss("naive", 1024, 0.04, 50), loss("fused", 4096, 0.1, 8),
        loss("naive", 4096, 0.5, 800),
        {"impl": "pml", "M": 4096, "D": 128, "status": "skipped", "device": "cpu"},
        {"kind": "largest_batch", "impl": "fused", "D": 128, "budget_mb": 1024, "largest_M": 131072,
         "peak_extra_mb": 90, "stopped_by": "search cap", "device": "cpu", "status": "ok"}])
    for labels, t in (("classes:100", 0.2), ("views:4", 0.3)):  # one section per labels pattern
        _write(res, "supcon", "2026-02-01T00:00:00", [loss("cpu", 4096, t, 9), loss("naive", 4096, 1.0, 900)],
               labels=labels)
    _write(res, "scale", "2026-02-01T00:00:00", [
        {"loss": "ntxent", "M": 4096, "D": 128, "W": w, "rows_per_rank": 4096 // w, "status": "ok",
         "rank_s": t} for w, t in ((1, 1.0), (4, 0.34))])
    _write(res, "lars", "2026-02-01T00:00:00", [
        {"model": "resnet18", "optimizer": o, "status": "ok", "step_ms": ms}
        for o, ms in (("fastclr-cpp", 6.0), ("lightly", 25.0))])
    _write(res, "augment", "2026-02-01T00:00:00", [
        {"size": 32, "pipeline": p, "device": "cpu", "images_per_s": v}
        for p, v in (("fastclr torch", 17000.0), ("torchvision DataLoader (2 workers)", 2000.0))])
    _write(res, "train", "2026-02-01T00:00:00", [
        {"model": "resnet18", "batch": 64, "loss": loss_, "optimizer": "fastclr", "augment": "torch",
         "swap": swap, "status": "ok", "images_per_s": v, "device": "cpu"}
        for loss_, swap, v in (("fused", None, 300.0), ("naive", "loss", 150.0))])
    _write(res, "knn", "2026-02-01T00:00:00", [
        {"impl": i, "queries": 100, "bank": 1000, "D": 8, "k": 5, "status": "ok", "search_s": t,
         "peak_extra_mb": 3.0, "index_mismatches": 0, "device": "cpu"}
        for i, t in (("fastclr", 0.5), ("faiss", 0.4))])
    _write(res, "grad_cache", "2026-02-01T00:00:00", [
        {"model": "resnet18", "size": 32, "batch": b, "micro_batch": m, "mode": "cached" if m else "plain",
         "status": "ok", "peak_extra_mb": mem, "step_s": t, "images_per_s": b / t, "device": "cpu"}
        for b, m, mem, t in ((128, None, 1000.0, 5.0), (1024, 128, 1100.0, 50.0), (1024, None, 9000.0, 40.0))]
        + [{"kind": "largest_batch", "model": "resnet18", "size": 32, "device": "cpu", "mode": "plain",
            "micro_batch": None, "largest_batch": 1024, "peak_extra_mb": 9000.0, "stopped_by": "oom at batch 2048",
            "status": "ok"}])
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- benchmarks:begin -->\nstale\n<!-- benchmarks:end -->\noutro\n")
    out = tmp_path / "report"
    report.main(["--results", str(res), "--out", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale" not in text
    assert "Test CPU, 2 threads" in text and "`python -m benchmarks.bench_train`" in text
    # the newest file's rows; "fused", the old name of the device's own backend, reads "cpu"
    assert "| 4096 | 128 | cpu | 0.0333 | 0.1000 | 0.20x | 8 |" in text
    assert "9.0000" not in text  # not the older file's
    assert "| cpu | 131072+ | 90 | search cap |" in text
    assert "| resnet18 | 64 | **naive** | fastclr | torch | 150 | 0.50x |" in text
    assert "| 100 x 1000, 8, 5 | fastclr | 0.500 | 1.25x | 3 | 0 of 500 |" in text
    # gradient caching: memory against plain at the micro-batch, time against plain at the batch
    assert "| resnet18 | 32 | 1024 | 128 | 1100 | 1.10x | 50.00 | 1.25x | 20 |" in text
    assert "| resnet18 | 32 | plain | 1024 | 9000 | oom at batch 2048 |" in text
    assert "labels classes:100 — CPU" in text and "labels views:4 — CPU" in text
    assert "| ntxent | 4096 | 128 | 4 | 1024 | 0.340 | 0.34x | 0.25x |" in text
    assert "| 4096 | 128 | cpu | 0.0667 | 0.2000 | 0.20x | 9 |" in text
    assert "| 4096 | 128 | cpu | 0.1000 | 0.3000 | 0.30x | 9 |" in text
    for kind in report.KINDS:
        names = ([f"{kind}-cpu-classes100.png", f"{kind}-cpu-views4.png"] if kind == "supcon"
                 else [f"{kind}-cpu.png"])
        for name in names:
            assert (out / name).stat().st_size > 1000
            assert f"![{kind}](report/{name})" in text
    assert common.where({"machine": {"cpu": "X", "torch_threads": 1}}) == "X, 1 threads"
