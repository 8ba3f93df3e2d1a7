"""Image folders read file by file: an unlabeled folder (``--dataset folder``, every image file
under it, at any depth) and the training split of a labelled one (``--dataset imagefolder``).

``FileBatches`` reads training batches in ``sampling.BatchOrder``: each image is decoded in a
DataLoader worker and its V views are cropped from the decoded original there (SimCLR's random
resized crop: ``imagefiles.crop_box``, drawn from (seed, epoch, image, view) alone, so the draws
do not depend on --workers or the number of ranks), then resized to the view size; the rest of the
augmentation runs batched in the loop. A file that cannot be decoded is skipped: its slot takes
the image one global batch further along the epoch's permutation (and further, while those are
bad too), so every step keeps its size, and the order is a function of the seed and of which
files are bad -- not of when they were found. Bad files are reported once, counted, kept in the
checkpoint (a resumed run and every rank skip them without decoding them again) and listed in
<out>/bad_files.txt.
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from . import imagefiles
from .sampling import BatchOrder

REFILL_TRIES = 64  # candidates per slot before a batch is declared impossible to fill
EVAL_EPOCH = 2**31 - 1  # the "epoch" of the evaluation sample's crops (no training epoch reaches it)
EVAL_SAMPLE = 512  # at most this many images held out for the unlabeled evaluation ...
HELD_OUT_SEED = 0x4E1D  # ... a fixed choice of 5% of a folder of 40 images or more


@dataclass
class FolderImages:
    """An unlabeled image folder: ``files`` relative to ``root``, sorted."""
    name: str
    root: str
    files: list
    mean: tuple
    std: tuple
    num_classes: int = 0  # 0: no labels
    labels: list | None = None  # a labelled folder's class per file
    bad: dict = field(default_factory=dict)  # file index -> why it cannot be decoded
    held_out: list = field(default_factory=list)  # file indices kept out of training (evaluation)

    @property
    def train_ids(self) -> list:
        """The file indices training reads: all but the held-out ones."""
        out = set(self.held_out)
        return [i for i in range(len(self.files)) if i not in out]

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i])

    def bad_files(self) -> dict:
        """{relative path: why} of the files found bad so far (a checkpoint keeps it)."""
        return {self.files[i]: why for i, why in sorted(self.bad.items())}

    def digest(self) -> str:
        """A fingerprint of the file list (a resumed run checks it)."""
        return hashlib.sha256("\n".join(self.files).encode()).hexdigest()

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the file list's fingerprint and the bad files."""
        return {"files": self.digest(), "count": len(self.files), "bad_files": self.bad_files()}

    def load_state_dict(self, state: dict, *, rescan: bool, where: str) -> None:
        """A checkpoint's record; a folder whose files changed since is refused unless ``rescan``
        (``where``: the file list the run began with, for the message)."""
        if state["files"] != self.digest() and not rescan:
            then = _read_list(where)
            change = (f" ({len(set(self.files) - set(then))} added, {len(set(then) - set(self.files))} "
                      f"removed since the run began; {where} lists its files)" if then else "")
            raise SystemExit(f"--resume: the files under {self.root} changed{change}: the data order "
                             "would change. Resume with --rescan to train on the folder as it is now, "
                             "or restore the folder")
        index = {f: i for i, f in enumerate(self.files)}
        self.bad = {index[f]: why for f, why in state["bad_files"].items() if f in index}


def _read_list(path: str) -> list:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


def load(root: str | None, mean, std) -> FolderImages:
    if root is None:
        raise ValueError("--dataset folder needs --data-dir: the folder of images (any depth, any "
                         "sub-folders; no labels needed)")
    files = imagefiles.scan(root)
    if not files:
        raise FileNotFoundError(f"folder: no image files under {root} (looked for "
                                f"{', '.join(imagefiles.EXTENSIONS)} at any depth)")
    held = min(EVAL_SAMPLE, len(files) // 20) if len(files) >= 40 else 0
    held_out = sorted(np.random.default_rng(HELD_OUT_SEED).choice(len(files), held, replace=False).tolist())
    return FolderImages("folder", root, files, mean, std, held_out=held_out)


def crop_views(img, size: int, *, seed: int, epoch: int, image: int, views: int, scale,
               ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """(V, 3, S, S) uint8: ``views`` random resized crops of the decoded ``img`` (file index
    ``image``), each box drawn from (seed, epoch, image, view) alone, then resized."""
    out = []
    for v in range(views):
        rng = np.random.default_rng([seed, epoch, image, v, 0x5EED])
        box = imagefiles.crop_box(rng, img.width, img.height, scale, ratio)
        out.append(imagefiles.resized_crop(img, box, size).transpose(2, 0, 1))
    return np.stack(out)


class _EpochBatches(torch.utils.data.Dataset):
    """Batch ``k`` of one epoch, read in a worker: (views uint8 (V, b, 3, S, S), image indices,
    {index: why} of the bad files met, images tried), or views None when a slot cannot be filled."""

    def __init__(self, source: FileBatches, epoch: int):
        self.source, self.epoch = source, epoch

    def __len__(self):
        return len(self.source)

    def __getitem__(self, k: int):
        src, order = self.source, self.source.order
        ids = src.ids
        slots = order.batch(self.epoch, k).tolist()
        lo = k * order.global_batch + order.rank * order.local
        views, chosen, bad, tried = [], [], {}, 0
        for p, first in enumerate(slots):
            for j in range(REFILL_TRIES):
                i = ids[first if j == 0 else order.position(self.epoch, lo + p + j * order.global_batch)]
                if i in src.ds.bad or i in bad:
                    continue
                tried += 1
                try:
                    img = imagefiles.decode(src.ds.path(i))
                except imagefiles.BadImage as exc:
                    bad[i] = str(exc)
                    continue
                views.append(src.crop_views(img, self.epoch, i))
                chosen.append(i)
                break
            else:
                return None, torch.tensor(chosen), bad, tried
        return torch.from_numpy(np.stack(views, axis=1)), torch.tensor(chosen), bad, tried


class FileBatches:
    """Training batches of a ``FolderImages`` in ``BatchOrder``: ``epoch(e, start)`` yields
    ``(views uint8 (V, b, 3, S, S), labels (b,))`` (-1 without labels), each view already cropped
    from the original; ``ds.bad`` (file index -> why) grows as bad files are met."""

    augmented = False
    cropped = True  # the loop's augmentation must not crop again

    def __init__(self, ds: FolderImages, size: int, global_batch: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1, workers: int = 4, views: int = 2,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), max_bad: float = 0.05, report=None):
        self.ds, self.size, self.views, self.scale, self.ratio = ds, size, views, scale, ratio
        self.ids = ds.train_ids  # the batch order runs over these file indices
        self.order = BatchOrder(len(self.ids), global_batch, seed=seed, rank=rank, world_size=world_size)
        self.seed, self.workers, self.max_bad = seed, workers, max_bad
        self.report = report  # report(ds, {file index: why}) of newly bad files (None: nobody)
        self.tried = self.met = 0

    def __len__(self) -> int:
        return len(self.order)

    def crop_views(self, img, epoch: int, i: int) -> np.ndarray:
        """(V, 3, S, S) uint8: image ``i``'s views of ``epoch``."""
        return crop_views(img, self.size, seed=self.seed, epoch=epoch, image=i, views=self.views,
                          scale=self.scale, ratio=self.ratio)

    def epoch(self, epoch: int, start: int = 0):
        if start >= len(self):
            return
        loader = torch.utils.data.DataLoader(
            _EpochBatches(self, epoch), batch_size=None, sampler=range(start, len(self)),
            num_workers=self.workers, pin_memory=torch.cuda.is_available())
        for views, chosen, bad, tried in loader:
            self._account(bad, tried)
            if views is None:
                raise SystemExit(f"fastclr.train: {self.ds.root}: {len(self.ds.bad)} files cannot be "
                                 f"decoded, and none of the {REFILL_TRIES} tried for a place in a batch "
                                 "could" + self._summary())
            yield views, self._labels(chosen.tolist())

    def _labels(self, chosen: list) -> torch.Tensor:
        """The chosen files' classes, or -1 for an unlabeled folder."""
        labels = self.ds.labels
        return torch.tensor([-1 if labels is None else labels[i] for i in chosen], dtype=torch.long)

    def _account(self, bad: dict, tried: int) -> None:
        new = {i: why for i, why in bad.items() if i not in self.ds.bad}
        self.ds.bad.update(new)
        if new and self.report is not None:
            self.report(self.ds, new)
        self.tried += tried
        self.met += len(new)

    def counts(self) -> tuple:
        """(files read, files found bad) by this process so far: the loop sums them over the
        ranks and asks ``over_limit``."""
        return self.tried, self.met

    def over_limit(self, tried: int, met: int) -> str | None:
        """What to say when more than --max-bad-files of the files read (by every rank) were
        bad, judged once the first min(200, all) files were read; else None."""
        if tried >= min(len(self.ids), 200) and met > self.max_bad * max(tried, 1):
            return (f"{self.ds.root}: {met} of the {tried} files read so far cannot be decoded, more "
                    f"than --max-bad-files {self.max_bad:g} of them" + self._summary())
        return None

    def _summary(self) -> str:
        names = [self.ds.files[i] for i in sorted(self.ds.bad)[:5]]
        return f" (e.g. {', '.join(names)}); they are listed in bad_files.txt" if names else ""



def sample_views(ds: FolderImages, size: int, *, seed: int, scale, views: int = 2) -> tuple:
    """(uint8 (views, m, 3, S, S), what they are): two crops of each decodable image held out
    from training -- or, in a folder too small to hold any out (under 40 images), of a fixed
    choice of up to EVAL_SAMPLE of its images. Bad files met are said on stderr and added to
    ``ds.bad``."""
    held = bool(ds.held_out)
    pick = ds.held_out if held else np.random.default_rng(HELD_OUT_SEED).permutation(len(ds.files))[:EVAL_SAMPLE]
    out = []
    for i in map(int, pick):
        if i in ds.bad:
            continue
        try:
            out.append(crop_views(imagefiles.decode(ds.path(i)), size, seed=seed, epoch=EVAL_EPOCH, image=i,
                                  views=views, scale=scale))
        except imagefiles.BadImage as exc:
            ds.bad[i] = str(exc)
            print(f"skipped {ds.files[i]}: it cannot be decoded ({exc})", file=sys.stderr)
    if len(out) < 2:
        raise ValueError(f"fewer than two images of the evaluation sample under {ds.root} can be decoded")
    what = (f"{len(out)} images held out from training (a fixed 5% of the folder)" if held else
            f"{len(out)} of the folder's training images (too few to hold any out)")
    return torch.from_numpy(np.stack(out, axis=1)), what
