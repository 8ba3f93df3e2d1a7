"""The README's Fashion-MNIST table: the recipe's SimCLR features against the same network trained
supervised, at random initialisation, and the raw pixels, with the published baselines beside.

    python -m benchmarks.fashion_mnist_table [--out runs/fashion_mnist_table] [--validation N]

Each step is a command (printed before it runs) whose output stays in --out, and a step whose
output is there already is not run again: the table can be built over several sittings (each
training run is up to an hour on a 2-core CPU), and a stopped training run resumes from its
checkpoint. The steps:

1. ``python -m fastclr.train --config fashion_mnist``                       -> OUT/simclr
2. the same with ``--loss supervised`` (same network, augmentation, epochs)  -> OUT/supervised
3. ``python -m fastclr.evaluate OUT/simclr --protocols all``, the same with ``--random-init``
   and with ``--features pixels``; ``python -m fastclr.evaluate OUT/supervised --protocols all``
   (every protocol on the 10,000 test images; --validation N: on N held-out training images).

Then OUT/table.md: one row per feature set, the published figures and the hardware and date.
Extra arguments after ``--`` go to both training runs (``-- --precision bf16``).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

# Xiao, Rasul & Vollgraf 2017 (arXiv:1708.07747), Table 3: the best of each scikit-learn model on
# the pixels; and the dataset's README (github.com/zalandoresearch/fashion-mnist, "Benchmark").
PUBLISHED = [
    ("kNN on pixels (KNeighborsClassifier, best setting)", "Xiao et al. 2017, Table 3", 0.854),
    ("logistic regression on pixels (best setting)", "Xiao et al. 2017, Table 3", 0.842),
    ("SVC on pixels (best setting)", "Xiao et al. 2017, Table 3", 0.897),
    ("ResNet-18, supervised", "fashion-mnist README, benchmark table", 0.949),
]
ROWS = [  # (row, run, evaluate's extra flags, its eval file's stem)
    ("SimCLR (the recipe)", "simclr", [], "eval"),
    ("supervised, same network and budget", "supervised", [], "eval"),
    ("random initialisation", "simclr", ["--random-init"], "eval_random_init"),
    ("raw pixels", "simclr", ["--features", "pixels"], "eval_pixels"),
]


def run(cmd: list) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(out: str, extra: list, validation: int, train_args: list) -> None:
    ckpt = os.path.join(out, "checkpoint.pt")
    if os.path.isfile(os.path.join(out, "eval.json")):
        return  # finished (training writes eval.json last)
    cmd = [sys.executable, "-m", "fastclr.train", "--config", "fashion_mnist", "--out", out,
           "--validation", str(validation), *extra, *train_args]
    run(cmd + (["--resume", ckpt] if os.path.isfile(ckpt) else []))


def training_minutes(run_dir: str) -> float:
    """The run's training time (its metrics.csv's last elapsed_s: evaluation not included)."""
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["elapsed_s"]) / 60 if rows else float("nan")


def evaluate(run_dir: str, extra: list, stem: str, out: str, validation: int) -> dict:
    path = os.path.join(out, f"{stem}.json")
    if not os.path.isfile(path):
        os.makedirs(out, exist_ok=True)
        run([sys.executable, "-m", "fastclr.evaluate", run_dir, "--protocols", "all", "--out", out,
             "--validation", str(validation), "--no-progress", *extra])
    with open(path) as f:
        return json.load(f)


def cells(results: dict) -> list:
    def get(*keys):
        r = results
        for k in keys:
            if not isinstance(r, dict) or k not in r:
                return "–"
            r = r[k]
        return f"{r:.3f}"
    return [get("knn", "top1"), get("linear", "top1"), get("kmeans", "nmi"), get("kmeans", "ari"),
            get("finetune", "0.01", "pretrained", "top1"), get("finetune", "0.1", "pretrained", "top1"),
            get("finetune", "0.01", "scratch", "top1"), get("finetune", "0.1", "scratch", "top1")]


def table(reports: list, minutes: dict, validation: int) -> str:
    split = f"{validation} held-out training images" if validation else "the 10,000 test images"
    head = ("| features | kNN top-1 | linear top-1 | k-means NMI | k-means ARI | fine-tune 1% | "
            "fine-tune 10% | from scratch 1% | from scratch 10% |")
    lines = [f"Fashion-MNIST, evaluated on {split}; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}.", "", head,
             "|" + "---|" * 9]
    for (name, *_), report in zip(ROWS, reports):
        lines.append(f"| {name} | " + " | ".join(cells(report["results"])) + " |")
    lines += ["", "| published | source | test accuracy |", "|---|---|---|"]
    lines += [f"| {what} | {source} | {acc:.3f} |" for what, source, acc in PUBLISHED]
    lines += ["", "Training time: " + ", ".join(f"{k} {v:.1f} min" for k, v in minutes.items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("runs", "fashion_mnist_table"))
    p.add_argument("--validation", type=int, default=0,
                   help="train without, and evaluate on, this many training images (0: the test split)")
    p.add_argument("train_args", nargs="*", help="after --: more flags for both training runs")
    args = p.parse_args(argv)
    minutes = {}
    for name, extra in (("simclr", []), ("supervised", ["--loss", "supervised"])):
        train(os.path.join(args.out, name), extra, args.validation, args.train_args)
        minutes[name] = training_minutes(os.path.join(args.out, name))
    reports = [evaluate(os.path.join(args.out, run_name), extra, stem, os.path.join(args.out, "eval_" + run_name),
                        args.validation) for _, run_name, extra, stem in ROWS]
    text = table(reports, minutes, args.validation)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
