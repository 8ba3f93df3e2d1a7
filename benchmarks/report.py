"""Results files -> markdown tables and PNG plots, and the README's benchmark section.

    python -m benchmarks.report                       # benchmarks/results -> benchmarks/report
    python -m benchmarks.report --no-readme           # leave docs/benchmarks.md alone

For every kind of benchmark (loss, supcon, scale, lars, augment, train, grad_cache, knn) and device (and, for
supcon, labels pattern), the newest results file
under --results (searched recursively, so committed GPU suite folders count) becomes one section:
the hardware, the versions, the date, the command that reproduces it, the table and a plot.
The sections go to <out>/README.md and, between the README's ``<!-- benchmarks:begin -->`` and
``<!-- benchmarks:end -->`` markers, into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("loss", "supcon", "scale", "lars", "augment", "train", "grad_cache", "knn")
TITLES = {"loss": "NT-Xent loss: time and memory", "supcon": "SupCon loss (mean positives): time and memory",
          "scale": "Distributed loss: one rank's share",
          "lars": "LARS step",
          "augment": "Two-view augmentation", "train": "End-to-end training step, one component swapped",
          "grad_cache": "Gradient caching: a large batch in micro-batches",
          "knn": "kNN search (the evaluation monitor)"}
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def load_latest(results: Path) -> dict:
    """(kind, device, labels) -> the newest results file's payload (by its recorded date);
    labels is the SupCon benchmark's labels pattern, "" for every other kind."""
    latest = {}
    for path in sorted(results.rglob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(d, dict) or d.get("kind") not in KINDS:
            continue
        key = (d["kind"], d["machine"]["device"], d.get("labels", ""))
        if key not in latest or d["date"] > latest[key]["date"]:
            d["_path"] = path
            latest[key] = d
    return latest


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_loss(d, path):
    plt = _plt()
    rows = [r for r in d["rows"] if r.get("kind") != "largest_batch" and r.get("status") == "ok"]
    d0 = 128 if any(r["D"] == 128 for r in rows) else rows[0]["D"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        pts = sorted((r["M"], r["fwd_bwd_s"], r["peak_extra_mb"]) for r in rows
                     if r["impl"] == impl and r["D"] == d0)
        if pts:
            m, t, mem = zip(*pts)
            a1.plot(m, t, "o-", label=impl)
            a2.plot(m, mem, "o-", label=impl)
    for a, yl in ((a1, "forward+backward (s)"), (a2, "peak extra memory (MiB)")):
        a.set(xscale="log", yscale="log", xlabel="M = 2N rows", ylabel=yl)
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    what = f"SupCon, labels {d['labels']}" if d.get("kind") == "supcon" else "NT-Xent"
    fig.suptitle(f"{what}, D = {d0}, {common.where(d)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bars(labels, values, title, xlabel, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.2))
    ax.barh(range(len(values)), values)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel, title=title)
    ax.title.set_fontsize(9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_lars(d, path):
    ok = [r for r in d["rows"] if r.get("status") == "ok"]
    _bars([f"{r['model']}: {r['optimizer']}" for r in ok], [r["step_ms"] for r in ok],
          f"LARS step, {common.where(d)}", "ms per step (lower is better)", path)


def plot_augment(d, path):
    rows = d["rows"]
    _bars([f"{r['size']} px: {r['pipeline']} ({r['device']})" for r in rows],
          [r["images_per_s"] for r in rows], f"two-view augmentation, {common.where(d)}",
          "images/s (higher is better)", path)


def plot_train(d, path):
    ok = [r for r in d["rows"] if r.get("status") == "ok"]
    def label(r):
        what = {None: "all fastclr", "bare": "bare encoder"}.get(r.get("swap"))
        return f"{r['model']} b{r['batch']}: " + (what or f"{r['swap']}={r[r['swap']]}")
    _bars([label(r) for r in ok], [r["images_per_s"] for r in ok],
          f"training step, {common.where(d)}", "images/s (higher is better)", path)


def plot_grad_cache(d, path):
    ok = [r for r in d["rows"] if r.get("kind") != "largest_batch" and r.get("status") == "ok"]
    _bars([f"{r['model']} batch {r['batch']}: " + (f"micro {r['micro_batch']}" if r["micro_batch"] else "plain")
           for r in ok], [r["peak_extra_mb"] for r in ok],
          f"training step's peak extra memory, {common.where(d)}", "MiB (lower is better)", path)


def plot_scale(d, path):
    ok = [r for r in d["rows"] if r.get("status") == "ok"]
    _bars([f"{r['loss']}, M={r['M']}: W={r['W']}" for r in ok], [r["rank_s"] for r in ok],
          f"one rank's loss forward+backward, {common.where(d)}", "seconds (lower is better)", path)


def plot_knn(d, path):
    ok = [r for r in d["rows"] if r.get("status") == "ok"]
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 2.6))
    names = [r["impl"] for r in ok]
    a1.barh(names, [r["search_s"] for r in ok])
    a1.set(xlabel="search (s, lower is better)")
    a2.barh(names, [r["peak_extra_mb"] for r in ok])
    a2.set(xlabel="peak extra memory (MiB)")
    r0 = ok[0] if ok else {"queries": "?", "bank": "?", "k": "?"}
    fig.suptitle(f"kNN, {r0['queries']} queries x {r0['bank']} bank, k={r0['k']}, {common.where(d)}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tables(kind, d) -> str:
    from benchmarks import (bench_augment, bench_grad_cache, bench_knn, bench_lars, bench_loss, bench_scale,
                            bench_train)
    if kind in ("loss", "supcon"):  # a GPU's rows are read against the matmul peak measured with them
        return bench_loss.tables(d["rows"], d.get("matmul_peak_tflops"))
    return {"lars": bench_lars.table, "augment": bench_augment.table, "train": bench_train.table,
            "knn": bench_knn.table, "scale": bench_scale.table, "grad_cache": bench_grad_cache.table}[kind](d["rows"])


def section(kind, d, img_rel: str) -> str:
    v = d.get("versions", {})
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    title = TITLES[kind] + (f", labels {d['labels']}" if d.get("labels") else "")
    return (f"#### {title} — {d['machine']['device'].upper()}: {common.where(d)}\n\n"
            f"{d['date'][:10]}; {vers}. Reproduce: `{d['command']}` "
            f"(results file `{d['_path'].relative_to(ROOT) if d['_path'].is_relative_to(ROOT) else d['_path']}`).\n\n"
            f"{tables(kind, d)}\n\n![{kind}]({img_rel})\n")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(common.RESULTS_DIR))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "report"))
    p.add_argument("--readme", default=str(ROOT / "docs" / "benchmarks.md"), help="the doc whose benchmark section is refreshed")
    p.add_argument("--no-readme", action="store_true")
    args = p.parse_args(argv)
    latest = load_latest(Path(args.results))
    if not latest:
        raise SystemExit(f"benchmarks.report: no results files under {args.results}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plotters = {"loss": plot_loss, "supcon": plot_loss, "scale": plot_scale, "lars": plot_lars, "augment": plot_augment, "train": plot_train,
                "grad_cache": plot_grad_cache, "knn": plot_knn}
    sections_local, sections_readme = [], []
    for device in ("cpu", "cuda"):
        for (kind, dev, labels), d in sorted(latest.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][2])):
            if dev != device:
                continue
            tag = f"-{labels.replace(':', '')}" if labels else ""
            img = out / f"{kind}-{device}{tag}.png"
            plotters[kind](d, img)
            sections_local.append(section(kind, d, img.name))
            readme_dir = Path(args.readme).resolve().parent
            sections_readme.append(section(kind, d, os.path.relpath(img, readme_dir)))
    (out / "README.md").write_text("# fastclr benchmark report\n\nGenerated by `python -m benchmarks.report` "
                                   "from the newest results file of each kind and device.\n\n"
                                   + "\n".join(sections_local))
    print(f"report: {out / 'README.md'} ({len(sections_local)} sections)")
    if not args.no_readme:
        readme = Path(args.readme)
        text = readme.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            readme.write_text(head + BEGIN + "\n" + "\n".join(sections_readme) + END + tail)
            print(f"README: benchmark section refreshed ({readme})")
        else:
            print(f"README: no {BEGIN} / {END} markers in {readme}; left alone")


if __name__ == "__main__":
    main()
