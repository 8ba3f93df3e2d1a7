"""``python -m fastclr.evaluate RUN_DIR_OR_CHECKPOINT``: judge a saved run's backbone with the
protocols of fastclr/app/evaluate.py (kNN, linear probe, k-means, few-label fine-tuning, t-SNE).

The checkpoint's own configuration says the dataset, the model and the preprocessing; flags pick
the protocols (``--protocols``, default knn,linear,kmeans,tsne; ``all`` adds finetune), another
dataset (``--dataset``/``--data-dir``: transfer), the model at random initialisation instead of
the trained one (``--random-init``: the floor), or no network at all (``--features pixels``: the
protocols on the normalised pixels of the unaugmented images, the baseline every representation
should beat), and the protocols' settings. It writes, into the run folder (or ``--out``),
``eval.json`` (every figure with its protocol's settings; the few-label subsets' image indices),
``eval.md`` (the tables) and the plots, and prints the summary table. Outputs of another
dataset, of the random initialisation or of the pixels are named ``eval_<dataset>``,
``eval_random_init...``, ``eval_pixels...``. Nothing is written until every protocol has
finished: an evaluation stopped (Ctrl-C, SIGTERM) or failed leaves the folder as it was.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

import torch
from torch import nn

from . import checkpoint as ckpt_io
from . import data as data_mod
from . import evaluate as ev
from . import folder
from .augment import TorchSimCLRAugment
from .config import RunConfig
from .runtime import exit_on_signal, fast_paths, setup_distributed

EVAL_FORMAT = "fastclr-eval-1"
DEFAULT_PROTOCOLS = ("knn", "linear", "kmeans", "tsne")


# --- the protocols on a model -------------------------------------------------------------------

class PixelFeatures(nn.Module):
    """The "model" of ``--features pixels``: the normalised image itself, flattened, as the
    features (no head; nothing to fine-tune)."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Flatten(), None


def split_features(model, ds, config: RunConfig, device, *, dtype=None, channels_last=False,
                   workers: int = 4, head: bool = True, progress: bool = False) -> dict:
    """The backbone's (and the head's) features of the training and held-out splits."""
    size = config.image_size
    kw = dict(mean=ds.mean, std=ds.std, device=device, dtype=dtype, channels_last=channels_last,
              size=size, progress=progress)
    split = {}
    for name in ("train", "test"):
        batches = data_mod.eval_batches(ds, name, size, workers=workers)
        split[name] = ev.extract_features(model.backbone, batches, desc=f"features ({name})", **kw)
        if head and model.head is not None:
            split[f"head_{name}"] = ev.head_features(model.head, split[name][0])
    return split


class Plots:
    """The PNGs the protocols ask for, drawn only when the results are written (write_outputs):
    an evaluation writes nothing while it computes."""

    def __init__(self, prefix: str):
        self.prefix, self.pending = prefix, []

    def add(self, name: str, draw) -> str:
        """``draw(path)`` will write ``<prefix>_<name>.png``; returns that final path."""
        path = f"{self.prefix}_{name}.png"
        self.pending.append((path, draw))
        return path


def evaluate_model(model, ds, config: RunConfig, s: ev.Settings, protocols, device, *, fresh_model=None,
                   plots: Plots | None = None, sweep: bool = True, dtype=None, channels_last=False,
                   workers: int = 4) -> dict:
    """``{protocol: figures}`` and ``{"seconds": {protocol: s}}`` for ``model`` on ``ds``. ``plots``
    collects the PNGs to draw; ``fresh_model()``: the untrained network fine-tuning compares with."""
    model = model.to(device)
    if not ds.num_classes:  # no labels: what needs none
        return _unlabeled(model, ds, config, s, protocols, device, dtype)
    t0 = time.perf_counter()
    try:
        split = split_features(model, ds, config, device, dtype=dtype, channels_last=channels_last,
                               workers=workers, head=sweep, progress=s.progress)
    except ValueError as exc:
        raise SystemExit(f"fastclr.evaluate: {ds.name} does not fit the model: {exc}") from None
    seconds = {"features": time.perf_counter() - t0}
    out = {}
    if model.head is None and "finetune" in protocols:  # pixel features
        out["skipped"] = {"finetune": "pixel features: there is no network to fine-tune"}
        protocols = [p for p in protocols if p != "finetune"]
    for name in protocols:
        t0 = time.perf_counter()
        out[name] = _protocol(name, model, ds, config, s, split, device, fresh_model, plots, sweep)
        seconds[name] = time.perf_counter() - t0
    out["seconds"] = seconds
    return out


def _unlabeled(model, ds, config: RunConfig, s: ev.Settings, protocols, device, dtype) -> dict:
    """An unlabeled dataset: the protocols that need labels are skipped (said in the report), and
    the embeddings' alignment and uniformity (Wang & Isola 2020) are measured on a fixed sample."""
    t0 = time.perf_counter()
    views, sample = folder.sample_views(ds, config.image_size, seed=s.seed, scale=(config.crop_scale, 1.0))
    aug = TorchSimCLRAugment(config.image_size, strength=config.strength, mean=ds.mean, std=ds.std,
                             flip=config.flip, crop=False)
    gen = torch.Generator().manual_seed(s.seed)
    z = [ev.embed(model, aug(v, generator=gen, views=1)[0], device=device, dtype=dtype) for v in views]
    return {"skipped": {p: f"needs labels; --dataset {ds.name} has none" for p in protocols},
            "embedding": ev.alignment_uniformity(z[0], z[1]), "embedding_sample": sample,
            "seconds": {"embedding": time.perf_counter() - t0}}


def _protocol(name, model, ds, config, s, split, device, fresh_model, plots, sweep) -> dict:
    (_, yte), c = split["test"], ds.num_classes
    if name == "knn":
        return ev.knn_protocol(split, c, s, sweep=sweep)
    if name == "linear":
        result = ev.linear_protocol(split, c, s)
        if plots is not None:
            confusion = result["confusion"]
            plots.add("confusion", lambda path: ev.confusion_plot(path, confusion, "linear probe: confusion"))
        return result
    if name == "kmeans":
        return ev.kmeans_protocol(split["test"][0], yte, c, s)
    if name == "tsne":
        xy, y = ev.tsne_map(split["test"][0], yte, s)
        result = {"points": len(xy)}
        if plots is not None:
            result["png"] = plots.add("tsne", lambda path: ev.scatter_plot(path, xy, y, "t-SNE of held-out features"))
        return result
    labels = data_mod.train_labels(ds)
    starts = [("pretrained", model.backbone)]  # fine-tuning copies them: both serve every fraction
    if fresh_model is not None:
        starts.append(("scratch", fresh_model().backbone))
    return {f"{fraction:g}": _finetune_fraction(fraction, labels, starts, ds, config, s, device)
            for fraction in s.label_fractions}


def _finetune_fraction(fraction, labels, starts, ds, config, s, device) -> dict:
    """Fine-tuning on one label fraction from each start (pretrained, from scratch), on the
    same images."""
    idx = ev.few_label_subset(labels, fraction, s.seed)
    images = data_mod.train_images(ds, idx, config.image_size)
    y = torch.as_tensor(labels[idx])
    out = {"images": len(idx), "indices": idx.tolist()}
    for name, backbone in starts:
        t0 = time.perf_counter()
        net = ev.finetune(backbone, images, y, ds.num_classes, s, mean=ds.mean, std=ds.std,
                          device=device, desc=f"fine-tune {name} ({fraction:g} of the labels)")
        feats = ev.extract_features(net, data_mod.eval_batches(ds, "test", config.image_size),
                                    mean=ds.mean, std=ds.std, device=device)
        out[name] = {**ev.topk_accuracy(feats[0], feats[1]), "seconds": time.perf_counter() - t0}
    return out


# --- outputs ----------------------------------------------------------------------------------

def summary_rows(results: dict) -> list:
    """(protocol, figure, value) rows: the headline figures."""
    rows = []
    r = results
    if "knn" in r:
        rows += [("kNN", f"top-{k} (k={r['knn']['k']}, T={r['knn']['temperature']:g})", r["knn"][f"top{k}"])
                 for k in (1, 5)]
    if "linear" in r:
        rows += [("linear probe", "top-1", r["linear"]["top1"]), ("linear probe", "top-5", r["linear"]["top5"]),
                 ("linear probe", "macro F1", r["linear"]["macro_f1"])]
    if "kmeans" in r:
        rows += [("k-means", m, r["kmeans"][key]) for m, key in
                 (("NMI", "nmi"), ("ARI", "ari"), ("cluster accuracy", "cluster_accuracy"))]
    rows += [("embedding", name, v) for name, v in r.get("embedding", {}).items()]
    for frac, f in r.get("finetune", {}).items():
        for start in ("pretrained", "scratch"):
            if start in f:
                rows.append((f"fine-tune {start}", f"top-1 ({frac} labels, {f['images']} images)",
                             f[start]["top1"]))
    return rows


def markdown(report: dict) -> str:
    r = report["results"]
    lines = [f"# Evaluation: {report['model']} on {report['dataset']}", "",
             f"Checkpoint `{report['checkpoint']}` (epoch {report['epoch']}, step {report['step']}), "
             f"{report['backbone']}, seed {report['settings']['seed']}.", "",
             "| protocol | figure | value |", "|---|---|---|"]
    lines += [f"| {p} | {f} | {v:.4f} |" for p, f, v in summary_rows(r)]
    for name, rows in r.get("knn", {}).get("sweep", {}).items():
        lines += ["", f"## kNN sweep, {name} features", "", "| k | T | top-1 | top-5 |", "|---|---|---|---|"]
        lines += [f"| {x['k']} | {x['temperature']:g} | {x['top1']:.4f} | {x['top5']:.4f} |" for x in rows]
    if "linear" in r:
        lines += ["", "## Linear probe, per class", "", "| class | precision | recall | F1 | support |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['class']} | {x['precision']:.3f} | {x['recall']:.3f} | {x['f1']:.3f} | "
                  f"{x['support']} |" for x in r["linear"]["per_class"]]
    if r.get("embedding_sample"):
        lines += ["", f"Alignment and uniformity (Wang & Isola 2020) of the projections of two views of "
                      f"each of {r['embedding_sample']}."]
    if r.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {p}: {why}" for p, why in r["skipped"].items()]
    lines += ["", "## Seconds", "", "| step | s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in r["seconds"].items()]
    return "\n".join(lines) + "\n"


def print_summary(report: dict) -> None:
    rows = summary_rows(report["results"])
    width = max((len(p) + len(f) for p, f, _ in rows), default=0) + 3
    print(f"{report['model']} on {report['dataset']}:")
    for p, f, v in rows:
        print(f"  {(p + ': ' + f).ljust(width)} {v:.4f}")


def write_outputs(report: dict, plots: Plots, out: str, stem: str) -> list:
    """The plots, eval.json and eval.md made in a staging folder inside ``out``, then each renamed
    into ``out``: every file appears whole or not at all, and the staging folder is removed in
    any case."""
    staging = tempfile.mkdtemp(prefix=f".{stem}.", dir=out)
    try:
        for path, draw in plots.pending:
            draw(os.path.join(staging, os.path.basename(path)))
        with open(os.path.join(staging, f"{stem}.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(staging, f"{stem}.md"), "w") as f:
            f.write(markdown(report))
        written = []
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(out, name))
            written.append(os.path.join(out, name))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --- the command ------------------------------------------------------------------------------

def _fractions(text: str) -> tuple:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of fractions, got {text!r}") from None
    if not values or any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every label fraction must be in (0, 1), got {text!r}")
    return values


def _protocols(text: str) -> tuple:
    names = ev.PROTOCOLS if text == "all" else tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in ev.PROTOCOLS]
    if unknown or not names:
        what = ", ".join(unknown) if unknown else repr(text)
        raise argparse.ArgumentTypeError(f"unknown protocol {what}; choose from "
                                         f"{', '.join(ev.PROTOCOLS)} (or all)")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastclr.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("run", metavar="RUN_DIR_OR_CHECKPOINT", help="a training run's folder or its checkpoint.pt")
    a("--protocols", type=_protocols, default=DEFAULT_PROTOCOLS,
      help=f"comma-separated, from {', '.join(ev.PROTOCOLS)}, or all (default: {','.join(DEFAULT_PROTOCOLS)})")
    a("--dataset", choices=data_mod.DATASETS, help="evaluate on another dataset (transfer; default: "
      "the run's)")
    a("--data-dir", help="that dataset's folder (default: the run's)")
    a("--val-dir", help="a labelled folder (one sub-folder per class) to evaluate on, split per "
      "class by a seeded order into the training part and the test part (default: the run's "
      "--val-dir, if any)")
    a("--random-init", action="store_true", help="the run's network at a seeded random "
      "initialisation instead of its trained weights (the floor)")
    a("--features", choices=("model", "pixels"), default="model",
      help="model: the network's features; pixels: the normalised pixels of the unaugmented "
      "images at the run's view size, flattened (the baseline; no fine-tuning)")
    a("--validation", type=int, help="evaluate on this many of the training images held out "
      "(data.validation_split) instead of the test split; 0: the test split (default: the run's)")
    a("--out", help="where the outputs go (default: the run folder)")
    a("--label-fraction", type=_fractions, default=(0.01, 0.1),
      help="finetune: the labelled fractions of the training split (default: 0.01,0.1)")
    a("--finetune-steps", type=int, default=300, help="finetune: optimizer steps (default: 300)")
    a("--finetune-lr", type=float, default=0.05, help="finetune: lr at 256 images a batch (default: 0.05)")
    a("--no-scratch", action="store_true", help="finetune: skip the from-scratch comparison")
    a("--knn-k", type=int, help="the headline kNN's k (default: the run's)")
    a("--knn-temperature", type=float, help="the headline kNN's temperature (default: the run's)")
    a("--probe-epochs", type=int, help="linear-probe epochs (default: the run's)")
    a("--kmeans-restarts", type=int, default=10, help="k-means restarts (default: 10)")
    a("--tsne-points", type=int, default=2000, help="t-SNE: at most this many points (default: 2000)")
    a("--seed", type=int, help="every protocol's seed (default: the run's)")
    a("--device", default="auto", help="auto | cpu | cuda")
    a("--workers", type=int, default=4, help="image-folder decoding processes")
    a("--no-progress", action="store_true", help="no progress bars")
    a("--deterministic", action="store_true", help="fp32 and contiguous on every CPU (default: the "
      "run's --precision/--channels-last, whose auto is bf16 and channels-last on a CPU with native "
      "bf16 dot products)")
    return p


def settings_of(config: RunConfig, args=None, *, progress: bool = True) -> ev.Settings:
    """The protocols' settings: the run's kNN / probe / seed, overridden by the command line."""
    def pick(name, default):
        value = getattr(args, name, None) if args is not None else None
        return default if value is None else value
    s = ev.Settings(seed=pick("seed", config.seed), knn_k=pick("knn_k", config.knn_k),
                    knn_temperature=pick("knn_temperature", config.knn_temperature),
                    probe_epochs=pick("probe_epochs", config.probe_epochs), progress=progress)
    if args is not None:
        s.label_fractions, s.finetune_steps = args.label_fraction, args.finetune_steps
        s.finetune_lr, s.kmeans_restarts, s.tsne_points = args.finetune_lr, args.kmeans_restarts, args.tsne_points
    for name in ("knn_k", "probe_epochs", "finetune_steps", "kmeans_restarts", "tsne_points"):
        if getattr(s, name) < (0 if name == "probe_epochs" else 1):
            raise SystemExit(f"fastclr.evaluate: --{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    if not s.knn_temperature > 0 or not s.finetune_lr > 0:
        raise SystemExit("fastclr.evaluate: --knn-temperature and --finetune-lr must be > 0")
    return s


def _dataset(args, config: RunConfig):
    name = args.dataset or config.dataset
    data_dir = args.data_dir if args.dataset or args.data_dir else config.data_dir
    validation = args.validation if args.validation is not None else 0 if args.dataset else config.validation
    try:
        ds = data_mod.load_dataset(name, data_dir, synthetic_size=config.synthetic_size,
                                   synthetic_image_size=config.image_size, validation=validation)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"fastclr.evaluate: {exc}") from None
    return evaluation_data(ds, config, args.val_dir or (None if args.dataset else config.val_dir),
                       "fastclr.evaluate", args.workers)


def evaluation_data(ds, config: RunConfig, val_dir: str | None, program: str, workers: int | None = None):
    """``ds``, or with ``val_dir`` the labelled folder (data.labelled_folder) evaluation reads
    instead; its bad files are said on stderr."""
    if not val_dir:
        return ds
    try:
        labelled = data_mod.labelled_folder(val_dir, config.image_size, ds.mean, ds.std, seed=config.seed,
                                            workers=config.workers if workers is None else workers)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"{program}: {exc}") from None
    for path, why in labelled.skipped.items():
        print(f"{program}: --val-dir: skipped {path}: it cannot be decoded ({why})", file=sys.stderr)
    return labelled


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    ckpt, config, ckpt_path = ckpt_io.load_run(args.run)
    s = settings_of(config, args, progress=not args.no_progress)
    ds = _dataset(args, config)
    out = args.out or os.path.dirname(os.path.abspath(ckpt_path))
    ckpt_io.check_output_folder(out, "fastclr.evaluate", "give --out")
    device, _, _ = setup_distributed(args.device)
    # the run's precision and layout, as training chose them on this device (runtime.fast_paths)
    dtype, channels_last = fast_paths(config.precision, config.channels_last, device,
                                      deterministic=args.deterministic)
    pixels = args.features == "pixels"
    if pixels and args.random_init:
        raise SystemExit("fastclr.evaluate: --features pixels has no network to initialise; drop --random-init")
    stem = "_".join(["eval"] + (["random_init"] if args.random_init else []) + (["pixels"] if pixels else [])
                    + ([ds.name] if ds.name != config.dataset else []))
    if pixels:
        model, fresh = PixelFeatures(), None
    else:
        model = ckpt_io.model_of(ckpt, config, random_init=args.random_init, num_classes=ds.num_classes)
        fresh = None if args.no_scratch else (
            lambda: ckpt_io.model_of(ckpt, config, random_init=True, num_classes=ds.num_classes))
    with exit_on_signal(f"during the evaluation; {out} is as it was"):
        report = evaluate_into(
            out, stem,
            lambda plots: evaluate_model(model, ds, config, s, args.protocols, device, fresh_model=fresh,
                                         plots=plots, dtype=dtype, channels_last=channels_last,
                                         workers=args.workers),
            lambda results: make_report(config, ckpt["run"], ckpt_path, ds, s, results, args.protocols,
                                        "pixels" if pixels else "random init" if args.random_init else None))
    print_summary(report)
    print(f"wrote {os.path.join(out, stem)}.json, .md and plots", file=sys.stderr)
    return report


def make_report(config: RunConfig, run: dict, ckpt_path: str, ds, s: ev.Settings, results: dict,
                protocols, model: str | None = None) -> dict:
    """eval.json's contents: what was evaluated (``model``: "random init", "pixels"; default the
    run's network), on what, with which settings, and the figures."""
    return {"format": EVAL_FORMAT, "checkpoint": os.path.abspath(ckpt_path),
            "model": model or f"{config.loss} run",
            "dataset": ds.name, "pretrained_on": config.dataset, "backbone": config.backbone,
            "epoch": run["epoch"], "step": run["step"], "protocols": list(protocols),
            "settings": dataclasses.asdict(s), "results": results,
            **({"split": ds.note, "skipped_files": ds.skipped} if getattr(ds, "note", "") else {})}


def evaluate_into(out: str, stem: str, evaluate, report, guard=None) -> dict:
    """``evaluate(plots) -> results``, then ``report(results)`` written as ``out/stem.json``,
    ``.md`` and the plots (write_outputs) -- nothing is written before every protocol finished,
    so a stop or a failure leaves ``out`` as it was. ``guard(write)`` runs the writing (the
    training loop's turns a refused write into its one message); computing is outside it."""
    plots = Plots(os.path.join(out, stem))
    contents = report(evaluate(plots))
    (guard or (lambda write: write()))(lambda: write_outputs(contents, plots, out, stem))
    return contents
