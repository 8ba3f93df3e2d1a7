"""What a run measures and writes about itself: the step's sums kept on the device
(``DeviceSums``, read once every --log-every steps), the per-epoch rows (metrics.csv), the
curves (curves.png), and for an image folder the files it trains on (files.txt) and those it
skipped (bad_files.txt). Files are written atomically (checkpoint.atomic_write)."""
from __future__ import annotations

import csv
import io
import os
import signal
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import atomic_write

METRIC_FIELDS = ("epoch", "step", "loss", "contrastive_top1", "lr", "images_per_sec", "knn_top1",
                 "bad_steps", "elapsed_s")


class DeviceSums:
    """The step's bookkeeping, on the device: loss and top-1 sums of the steps that updated,
    their count, the skipped steps and the current run of them. ``read`` is the one host
    synchronisation (and, with several processes, one all-reduce that also carries the stop
    request)."""

    def __init__(self, device, bad_run: int):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.bad_run = torch.tensor(float(bad_run), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, top1: torch.Tensor, found_inf: torch.Tensor) -> None:
        bad = found_inf.reshape(()) > 0
        self.sums += torch.stack([torch.where(bad, 0.0, loss.double()),
                                  torch.where(bad, 0.0, top1.double()),
                                  (~bad).double(), bad.double()])
        self.bad_run.add_(1).mul_(bad)

    def read(self, signum: int, group, counts=()) -> tuple:
        """(loss sum, top-1 sum, good steps, bad steps, bad run, signal) since the last read, and
        ``counts`` (host numbers, e.g. an image folder's files read and found bad) summed over
        the ranks, in the same all-reduce."""
        t = torch.cat([self.sums, self.bad_run.view(1), self.sums.new_tensor([float(signum), *counts])])
        world = 1
        if group is not None:
            dist.all_reduce(t, group=group)
            world = dist.get_world_size(group)
        values = t.tolist()
        (*values, signum), counts = values[:6], values[6:]
        self.sums.zero_()
        # the ranks agree on all but the loss, whose mean over ranks is the global batch's
        loss, top1, good, bad, bad_run = (v / world for v in values)
        if world > 1 and signum:
            signum = signal.SIGTERM  # a sum of the ranks' signals: say SIGTERM
        return loss, top1, round(good), round(bad), round(bad_run), int(signum), [round(c) for c in counts]


def write_metrics_csv(path: str, history: list) -> None:
    """The whole history, rewritten atomically, so a resumed run never repeats or loses a row."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_FIELDS})
    atomic_write(path, text.getvalue().encode())


def plot_curves(path: str, history: list, final: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(ep, [r["loss"] for r in history])
    ax1.set(xlabel="epoch", ylabel="contrastive loss", title="training loss")
    ax2.plot(ep, [r["contrastive_top1"] for r in history], label="contrastive top-1 (train batch)")
    knn = [(r["epoch"], r["knn_top1"]) for r in history if r.get("knn_top1") is not None]
    if knn:
        ax2.plot(*zip(*knn), "o-", label="kNN top-1 (held out)")
    if final.get("linear_top1") is not None:
        ax2.axhline(final["linear_top1"], ls="--", c="k", label="linear probe top-1 (held out)")
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, png.getvalue())


class BadFileLog:
    """An image folder's files that cannot be decoded: each said once on stderr as it is met,
    and all of them in <out>/bad_files.txt (path, tab, why), rewritten atomically."""

    def __init__(self, out: str):
        self.path = os.path.join(out, "bad_files.txt")

    def __call__(self, ds, new: dict) -> None:
        """``new``: {file index: why} of ``ds`` (a folder.FolderImages), just met."""
        for i in sorted(new):
            tqdm.write(f"fastclr.train: skipped {ds.files[i]}: it cannot be decoded ({new[i]})",
                       file=sys.stderr)
        self.write(ds)

    def write(self, ds) -> None:
        text = "".join(f"{f}\t{why}\n" for f, why in ds.bad_files().items())
        atomic_write(self.path, text.encode())


def files_list(out: str) -> str:
    """Where an image-folder run lists the files it trains on."""
    return os.path.join(out, "files.txt")


def write_file_list(out: str, files: list) -> None:
    """<out>/files.txt: an image folder's files, one a line, as the run reads them."""
    atomic_write(files_list(out), "".join(f + "\n" for f in files).encode())
