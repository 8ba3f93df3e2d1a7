"""``python -m fastclr.embed RUN FOLDER --out embeddings.npz``: every image under FOLDER through a
trained run's network -- what a self-supervised backbone is for: search, near-duplicates,
clustering.

For each image (at any depth, in sorted order) the file holds its path relative to FOLDER
(``paths``), the backbone's features (``features``, what evaluation and export use) and the
projection head's embedding (``embeddings``); ``bad_paths`` / ``bad_reasons`` list the files that
could not be decoded (skipped, never fatal). NumPy's npz, loadable with ``allow_pickle=False``;
``--fp16`` stores the vectors as float16. Images are preprocessed as the evaluation does: the short
side resized to view size x 256/224, the centre view-size square kept, the run's normalisation.

``--duplicates T`` also writes <out>_duplicates.csv: every pair of images whose features' cosine
similarity is at least T (path, path, similarity; each pair once, most similar first, searched
exactly with ``fastclr.knn_topk``). ``--neighbours K`` also writes <out>_neighbours.png: for a
fixed sample of query images (``--queries``), each query beside its K nearest neighbours.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from fastclr.similarity import knn_topk

from . import data, imagefiles
from .checkpoint import atomic_write, load_run, model_of
from .runtime import setup_distributed

MAX_DUPLICATE_NEIGHBOURS = 50  # neighbours searched per image for --duplicates


@torch.no_grad()
def embed_folder(run: str, folder: str, *, batch_size: int = 256, workers: int = 4, device="auto",
                 progress: bool = True) -> dict:
    """The embedding of every image under ``folder`` by the run (folder or checkpoint) ``run``:
    ``{"paths", "features", "embeddings", "bad_paths", "bad_reasons"}`` (float32 arrays)."""
    ckpt, config, _ = load_run(run, "fastclr.embed")
    files = imagefiles.scan(folder)
    if not files:
        raise SystemExit(f"fastclr.embed: no image files under {folder}")
    dev = setup_distributed(device)[0]
    model = model_of(ckpt, config, random_init=False, num_classes=1, program="fastclr.embed").to(dev).eval()
    mean, std = (torch.tensor(v, device=dev).view(1, 3, 1, 1) * 255 for v in data.normalisation(config.dataset))
    bar = lambda it: tqdm(it, desc="embedding", unit="batch", disable=not progress, file=sys.stderr)  # noqa: E731
    feats, embs, good, bad = [], [], [], {}
    for x, idx, skipped in imagefiles.centre_batches(folder, files, config.image_size, batch=batch_size,
                                                     workers=workers, progress=bar):
        bad.update(skipped)
        if len(x):
            h, z = model(((x.to(dev).float() - mean) / std))
            feats.append(h.float().cpu())
            embs.append(z.float().cpu())
            good += idx.tolist()
    if not good:
        raise SystemExit(f"fastclr.embed: none of the {len(files)} image files under {folder} can be decoded")
    return {"paths": np.array([files[i] for i in good]), "features": torch.cat(feats).numpy(),
            "embeddings": torch.cat(embs).numpy(), "bad_paths": np.array([files[i] for i in sorted(bad)], dtype=str),
            "bad_reasons": np.array([bad[i] for i in sorted(bad)], dtype=str)}


def duplicates(features: np.ndarray, threshold: float) -> list:
    """(i, j, cosine) of every pair i < j with cosine >= ``threshold``, most similar first (each
    image's nearest ``MAX_DUPLICATE_NEIGHBOURS`` are searched, exactly)."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    k = min(len(x), MAX_DUPLICATE_NEIGHBOURS + 1)
    values, index = knn_topk(x, x, k)
    pairs = {}
    for i in range(len(x)):
        for v, j in zip(values[i].tolist(), index[i].tolist()):
            if j != i and v >= threshold:
                pairs[(min(i, j), max(i, j))] = v
    return sorted(((i, j, v) for (i, j), v in pairs.items()), key=lambda p: (-p[2], p[0], p[1]))


def neighbours_picture(folder: str, paths, features: np.ndarray, k: int, queries: int, seed: int,
                       size: int = 96) -> bytes:
    """A PNG: one row per query image (a seeded sample), the query then its ``k`` nearest
    neighbours by cosine similarity of the features (thumbnails of ``size`` px)."""
    from PIL import Image, ImageDraw
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    k = min(k, len(x) - 1)
    picked = np.random.default_rng(seed).choice(len(x), min(queries, len(x)), replace=False)
    values, index = knn_topk(x[torch.from_numpy(picked)], x, k + 1)
    sheet = Image.new("RGB", ((k + 1) * (size + 4) + 4, len(picked) * (size + 4) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, q in enumerate(picked):
        row = [int(q)] + [j for j in index[r].tolist() if j != q][:k]
        for c, j in enumerate(row):
            img = imagefiles.decode(os.path.join(folder, str(paths[j])))
            thumb = Image.fromarray(imagefiles.centre_view(img, size))
            x0, y0 = 4 + c * (size + 4), 4 + r * (size + 4)
            sheet.paste(thumb, (x0, y0))
            if c == 0:
                draw.rectangle([x0 - 2, y0 - 2, x0 + size + 1, y0 + size + 1], outline=(220, 30, 30), width=2)
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    return buf.getvalue()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastclr.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", help="a training run's folder or its checkpoint.pt")
    p.add_argument("folder", metavar="FOLDER", help="the images to embed (any depth)")
    p.add_argument("--out", required=True, help="the .npz file to write")
    p.add_argument("--fp16", action="store_true", help="store features and embeddings as float16")
    p.add_argument("--duplicates", type=float, metavar="T", help="also write <out>_duplicates.csv: "
                   "the pairs with cosine similarity >= T")
    p.add_argument("--neighbours", type=int, metavar="K", help="also write <out>_neighbours.png: "
                   "sample queries beside their K nearest neighbours")
    p.add_argument("--queries", type=int, default=8, help="--neighbours: query images (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="--neighbours: which queries (default: 0)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="decoding processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.duplicates is not None and not -1 <= args.duplicates <= 1:
        raise SystemExit(f"fastclr.embed: --duplicates is a cosine similarity in [-1, 1], got {args.duplicates}")
    if args.neighbours is not None and args.neighbours < 1:
        raise SystemExit(f"fastclr.embed: --neighbours must be >= 1, got {args.neighbours}")
    out = embed_folder(args.run, args.folder, batch_size=args.batch_size, workers=args.workers,
                       device=args.device, progress=not args.no_progress)
    stored = {k: (v.astype(np.float16) if args.fp16 and v.dtype == np.float32 else v) for k, v in out.items()}
    buf = io.BytesIO()
    np.savez(buf, **stored)
    stem = args.out[:-4] if args.out.endswith(".npz") else args.out
    _write(args.out, buf.getvalue())
    if args.duplicates is not None:
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["path", "path", "similarity"])
        for i, j, v in duplicates(out["features"], args.duplicates):
            writer.writerow([out["paths"][i], out["paths"][j], f"{v:.6f}"])
        _write(f"{stem}_duplicates.csv", text.getvalue().encode())
    if args.neighbours is not None:
        _write(f"{stem}_neighbours.png", neighbours_picture(args.folder, out["paths"], out["features"],
                                                            args.neighbours, args.queries, args.seed))
    for path, why in zip(out["bad_paths"], out["bad_reasons"]):
        print(f"fastclr.embed: skipped {path}: it cannot be decoded ({why})", file=sys.stderr)
    print(f"wrote {args.out}: {len(out['paths'])} images ({len(out['bad_paths'])} skipped), features "
          f"{out['features'].shape[1]}, embeddings {out['embeddings'].shape[1]}", file=sys.stderr)
    return out


def _write(path: str, payload: bytes) -> None:
    try:
        atomic_write(path, payload)
    except OSError as exc:
        raise SystemExit(f"fastclr.embed: cannot write {path}: {exc.strerror or exc}") from None
