"""Datasets for ``python -m fastclr.train``.

Every dataset here is a train split and a held-out split of labelled images. For tuning, the
in-memory ones can hold out a validation split of their training images instead of their test
split (``validation=N``: N training images, stratified, always the same ones). The small ones live
in memory as uint8 arrays (N, H, W, 3); an image folder stays on disk.

- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 grey images, no
  download), split 80/20 stratified with a fixed seed, so every run evaluates on the same 360.
- ``cifar10`` / ``cifar100``: the python-pickle archives (``cifar-10-python.tar.gz`` or the
  folder it unpacks to) in ``data_dir``; never downloaded.
- ``fashion-mnist``: Zalando's 60,000 + 10,000 28x28 grey photographs of clothing, from its four
  IDX files (fastclr/app/idx.py: ``--data-dir``, Debian's package, or torchvision's download).
- ``imagefolder``: ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``.
- ``folder``: every image under ``data_dir``, at any depth, no labels (fastclr/app/folder.py).
- ``synthetic``: random images and labels, for throughput runs (evaluation is meaningless).

The training loop takes its batches from here through one interface, ``train_batches`` (an
object with ``len()`` = steps per epoch and ``epoch(e, start)`` yielding ``(x, labels)``), and
every source -- in-memory arrays, an image folder through DataLoader workers, DALI -- orders an
epoch by one scheme, ``sampling.BatchOrder``: so a run resumed at any batch sees the same images in the
same order as an uninterrupted one, whichever source it uses, on any number of processes.
"""
from __future__ import annotations

import os
import pickle
import sys
import tarfile
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from . import dali, folder, idx, imagefiles
from .augment import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD
from .sampling import BatchOrder

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100", "imagefolder", "folder", "synthetic")
# Fashion-MNIST's training-split statistics (one grey channel; checked against the files by the tests)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860406,) * 3, (0.3530242,) * 3
VALIDATION_SEED = 0  # the validation split is the same for every run
_CIFAR = {
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass
class ArrayDataset:
    """Images in memory: uint8 (N, H, W, 3) arrays and int64 labels."""
    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple
    std: tuple
    note: str = ""  # how the splits were made, where it is not the dataset's own
    skipped: dict = field(default_factory=dict)  # files that could not be decoded: path -> why

    @property
    def native_size(self) -> int:
        return self.train_images.shape[1]


@dataclass
class FolderDataset:
    """``root/train`` and ``root/val``, class folders of image files."""
    name: str
    root: str
    num_classes: int
    mean: tuple
    std: tuple

    @property
    def train_dir(self) -> str:
        return os.path.join(self.root, "train")

    @property
    def val_dir(self) -> str:
        return os.path.join(self.root, "val")


def load_dataset(name: str, data_dir: str | None = None, *, synthetic_size: int = 4096,
                 synthetic_image_size: int = 32, validation: int = 0):
    """Dataset ``name``; with ``validation`` > 0 (in-memory datasets) its held-out split is that
    many of the training images instead of the test split (validation_split)."""
    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {name!r}")
    if name in ("imagefolder", "folder"):  # read from disk
        if validation:
            raise ValueError(f"--validation: --dataset {name} is read from disk; give the images to "
                             "validate on as their own folder instead")
        return _folder(data_dir) if name == "imagefolder" else folder.load(data_dir, *normalisation("folder"))
    if name == "digits":
        ds = _digits()
    elif name == "fashion-mnist":
        ds = _fashion_mnist(data_dir)
    elif name in _CIFAR:
        ds = _cifar(name, data_dir)
    else:
        ds = _synthetic(synthetic_size, synthetic_image_size)
    return validation_split(ds, validation) if validation else ds


def normalisation(name: str) -> tuple:
    """(mean, std) per channel that dataset ``name``'s images are normalised with: CIFAR's usual
    values, the digits' and Fashion-MNIST's own training-split statistics, ImageNet's for every
    other dataset. The one place that decides it (training, evaluation, and export's record read
    it), without CIFAR's files."""
    if name in _CIFAR:
        return CIFAR_MEAN, CIFAR_STD
    if name == "digits":
        return _own_statistics(_digits_split()[0])
    if name == "fashion-mnist":
        return FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return IMAGENET_MEAN, IMAGENET_STD


def validation_split(ds: ArrayDataset, n: int) -> ArrayDataset:
    """``ds`` with ``n`` of its training images (stratified by label, seeded: the same ones every
    time) as the held-out split, and the rest as the training split; the test split is not used."""
    from sklearn.model_selection import train_test_split
    if not 0 < n < len(ds.train_labels):
        raise ValueError(f"--validation must be between 1 and {len(ds.train_labels) - 1} "
                         f"(the training images of {ds.name}), got {n}")
    try:
        train, val = train_test_split(np.arange(len(ds.train_labels)), test_size=n, stratify=ds.train_labels,
                                      random_state=VALIDATION_SEED)
    except ValueError as exc:  # fewer than one image per class
        raise ValueError(f"--validation {n}: {exc}") from None
    train, val = np.sort(train), np.sort(val)
    note = f"validation: {n} of the {len(ds.train_labels)} training images (stratified, seed {VALIDATION_SEED})"
    return replace(ds, train_images=ds.train_images[train], train_labels=ds.train_labels[train],
                   test_images=ds.train_images[val], test_labels=ds.train_labels[val], note=note)


def _own_statistics(train_images: np.ndarray) -> tuple:
    """(mean, std) of uint8 grey images, the same for the three channels."""
    return (float(train_images.mean() / 255),) * 3, (float(train_images.std() / 255),) * 3


def _digits_split() -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    grey = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    labels = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(rgb, labels, test_size=0.2, stratify=labels, random_state=0)
    return np.ascontiguousarray(xtr), ytr, np.ascontiguousarray(xte), yte


def _digits() -> ArrayDataset:
    xtr, ytr, xte, yte = _digits_split()  # normalisation("digits") without splitting twice
    return ArrayDataset("digits", xtr, ytr, xte, yte, 10, *_own_statistics(xtr))


def _fashion_mnist(data_dir: str | None) -> ArrayDataset:
    splits = idx.read_fashion_mnist(data_dir)
    (xtr, ytr), (xte, yte) = (splits[k] for k in ("train", "test"))
    rgb = [np.repeat(x[..., None], 3, axis=-1) for x in (xtr, xte)]  # grey -> 3 equal channels
    return ArrayDataset("fashion-mnist", rgb[0], ytr.astype(np.int64), rgb[1], yte.astype(np.int64),
                        10, *normalisation("fashion-mnist"))


def _unpickle(f):
    return pickle.load(f, encoding="bytes")


def _cifar(name: str, data_dir: str | None) -> ArrayDataset:
    archive, folder, train_files, test_files, label_key, classes = _CIFAR[name]
    if data_dir is None:
        raise ValueError(f"--dataset {name} needs --data-dir: the folder holding {archive} "
                         f"(or {folder}/), from {CIFAR_URL}; fastclr never downloads")
    tar_path, dir_path = os.path.join(data_dir, archive), os.path.join(data_dir, folder)
    if os.path.isdir(dir_path):
        def read(member):
            path = os.path.join(dir_path, member)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name}: {path} is missing; the folder {dir_path} should "
                                        f"hold {train_files + test_files}")
            with open(path, "rb") as f:
                return _unpickle(f)
    elif os.path.isfile(tar_path):
        tar = tarfile.open(tar_path, "r:gz")

        def read(member):
            try:
                return _unpickle(tar.extractfile(f"{folder}/{member}"))
            except KeyError:
                raise FileNotFoundError(f"{name}: {tar_path} has no {folder}/{member}; is it the "
                                        f"python version of the archive from {CIFAR_URL}?") from None
    else:
        raise FileNotFoundError(f"{name} not found: put {archive} (or the folder {folder}/ it unpacks "
                                f"to) in {data_dir}; get it from {CIFAR_URL} (python version). "
                                "fastclr never downloads")

    def split(members):
        xs, ys = [], []
        for m in members:
            batch = read(m)
            xs.append(np.asarray(batch[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(np.asarray(batch[label_key], np.int64))
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

    xtr, ytr = split(train_files)
    xte, yte = split(test_files)
    return ArrayDataset(name, xtr, ytr, xte, yte, classes, *normalisation(name))


def _folder(data_dir: str | None) -> FolderDataset:
    if data_dir is None:
        raise ValueError("--dataset imagefolder needs --data-dir, a folder with train/ and val/ "
                         "each holding one folder of images per class")
    classes = None
    for split in ("train", "val"):
        path = os.path.join(data_dir, split)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"imagefolder: {path} is missing; --data-dir must hold train/ "
                                    "and val/, each with one folder of images per class")
        found = sorted(e.name for e in os.scandir(path) if e.is_dir())
        if not found:
            raise FileNotFoundError(f"imagefolder: {path} has no class folders")
        if classes is not None and found != classes:
            raise ValueError(f"imagefolder: train/ and val/ have different class folders "
                             f"({len(classes)} vs {len(found)})")
        classes = found
    return FolderDataset("imagefolder", data_dir, len(classes), *normalisation("imagefolder"))


def _synthetic(n: int, size: int) -> ArrayDataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    k = max(1, n // 10)
    return ArrayDataset("synthetic", x[k:], y[k:], x[:k], y[:k], 10, *normalisation("synthetic"))


class ArrayBatches:
    """Training batches of an in-memory dataset in ``BatchOrder``: ``epoch(e, start)`` yields
    ``(uint8 (b, 3, H, W), labels (b,))`` for batches ``start..len-1`` of epoch ``e``."""

    augmented = False  # the loop augments the uint8 images itself

    def __init__(self, images: np.ndarray, labels: np.ndarray, global_batch: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.order = BatchOrder(len(images), global_batch, seed=seed, rank=rank, world_size=world_size)
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.order)

    def epoch(self, epoch: int, start: int = 0):
        pin = torch.cuda.is_available()  # pinned: the copy to the GPU does not block the host
        for idx in self.order.epoch(epoch, start):
            x, y = self.images[idx].permute(0, 3, 1, 2), self.labels[idx]
            yield (x.pin_memory(), y.pin_memory()) if pin else (x, y)


class DaliBatches:
    """Training batches augmented by DALI (``fastclr.app.dali.dali_loader``) in ``BatchOrder``:
    ``epoch(e, start)`` yields ``((view_1, ..., view_V), labels)`` on the training device.

    DALI runs ahead of the loop, so its source is told once, at the first ``epoch()`` call, where
    the run starts; later calls must continue epoch by epoch. A resumed run sees the same images
    in the same order; DALI's own random draws (the augmentation) start afresh."""

    augmented = True

    def __init__(self, source, global_batch: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, **loader_kw):
        self.source, self.loader_kw, self.seed = source, loader_kw, seed
        self.global_batch, self.rank, self.world = global_batch, rank, world_size
        self.loader, self.next_epoch, self._len = None, None, None

    def __len__(self) -> int:
        # counted once, without starting DALI (which would pin the start): the loop asks often,
        # and counting a folder means scanning it
        if self._len is None:
            n = len(self.source) if not isinstance(self.source, (str, os.PathLike)) else \
                len(_image_folder_files(self.source))
            self._len = len(BatchOrder(n, self.global_batch, world_size=self.world))
        return self._len

    def _open(self, epoch, start):
        if self.loader is None:
            self.loader = dali.dali_loader(
                self.source, self.global_batch // self.world, seed=self.seed, shard_id=self.rank,
                num_shards=self.world, start_epoch=epoch, start_batch=start, **self.loader_kw)
            self.next_epoch = (epoch, start)
        return self.loader

    def epoch(self, epoch: int, start: int = 0):
        loader = self._open(epoch, start)
        if (epoch, start) != self.next_epoch:
            raise RuntimeError(f"DaliBatches: epoch {epoch} batch {start} asked for, but DALI is "
                               f"set up to continue at epoch {self.next_epoch[0]} batch "
                               f"{self.next_epoch[1]}")
        self.next_epoch = (epoch + 1, 0)
        for *views, labels in loader:
            yield tuple(views), labels


def _image_folder_files(root) -> list:
    import torchvision
    return torchvision.datasets.ImageFolder(root).samples


def train_batches(ds, global_batch: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                  workers: int = 4, size: int = 32, dali: dict | None = None, files: dict | None = None):
    """The training batches of ``ds`` for one process: ``ArrayBatches`` (uint8 images for the
    loop's torch augmentation), ``folder.FileBatches`` for an image folder, labelled or not (views
    cropped from the originals in the workers; ``files``: its views, scale, max_bad and report), or
    ``DaliBatches`` when ``dali`` holds ``dali_loader``'s augmentation arguments. All in
    ``BatchOrder``."""
    kw = dict(seed=seed, rank=rank, world_size=world_size)
    if isinstance(ds, folder.FolderImages):
        if dali is not None:
            raise ValueError("--dataset folder is read by the torch path (--augment torch); DALI's "
                             "folder reader takes class folders (--dataset imagefolder)")
        return folder.FileBatches(ds, size, global_batch, workers=workers, **kw, **(files or {}))
    if dali is not None:
        source = ds.train_images if isinstance(ds, ArrayDataset) else ds.train_dir
        labels = ds.train_labels if isinstance(ds, ArrayDataset) else None
        return DaliBatches(source, global_batch, labels=labels, size=size, mean=ds.mean,
                           std=ds.std, **kw, **dali)
    if isinstance(ds, ArrayDataset):
        return ArrayBatches(ds.train_images, ds.train_labels, global_batch, **kw)
    return folder.FileBatches(labelled_files(ds), size, global_batch, workers=workers, **kw, **(files or {}))


def labelled_files(ds: FolderDataset) -> folder.FolderImages:
    """An image folder's training split as the files FileBatches reads, with their labels."""
    files, labels = _class_files(ds.train_dir)
    return folder.FolderImages(ds.name, ds.train_dir, files, ds.mean, ds.std, num_classes=ds.num_classes,
                               labels=labels)


def _class_files(root: str) -> tuple:
    """(files relative to ``root``, their classes) of a folder of class folders, in
    torchvision's ImageFolder order (classes sorted, then files)."""
    samples = _image_folder_files(root)
    return [os.path.relpath(p, root) for p, _ in samples], [c for _, c in samples]


def eval_batches(ds, split: str, size: int, *, workers: int = 4, batch: int = 512):
    """(uint8 (b, 3, size, size), labels) batches of a split ("train" | "test"), unaugmented, in
    order: arrays resized if needed; a folder resized (short side size x 256/224) and
    centre-cropped in DataLoader workers."""
    if isinstance(ds, ArrayDataset):
        images = ds.train_images if split == "train" else ds.test_images
        labels = torch.from_numpy(ds.train_labels if split == "train" else ds.test_labels)
        for lo in range(0, len(images), batch):
            yield eval_arrays(images[lo:lo + batch], size), labels[lo:lo + batch]
        return
    root = ds.train_dir if split == "train" else ds.val_dir
    files, labels = _class_files(root)
    labels = torch.tensor(labels)
    for x, idx, bad in imagefiles.centre_batches(root, files, size, batch=batch, workers=workers):
        for i, why in bad.items():
            print(f"evaluation: skipped {os.path.join(root, files[i])}: it cannot be decoded ({why})",
                  file=sys.stderr)
        yield x, labels[idx]


def eval_arrays(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, size, size), resized (bilinear, antialiased) if needed."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def train_labels(ds) -> np.ndarray:
    """The training split's labels (an image folder's from its file list; no image is read)."""
    if isinstance(ds, ArrayDataset):
        return ds.train_labels
    import torchvision
    return np.asarray(torchvision.datasets.ImageFolder(ds.train_dir).targets, np.int64)


def train_images(ds, indices, size: int) -> torch.Tensor:
    """uint8 (n, 3, size, size) training images ``indices``, unaugmented (as ``eval_batches``)."""
    indices = np.asarray(indices)
    if isinstance(ds, ArrayDataset):
        return eval_arrays(ds.train_images[indices], size)
    files = _class_files(ds.train_dir)[0]
    chosen = [files[int(i)] for i in indices]
    batches = list(imagefiles.centre_batches(ds.train_dir, chosen, size, workers=0))
    bad = [f"{chosen[i]} ({why})" for _, _, skipped in batches for i, why in skipped.items()]
    if bad:
        raise ValueError(f"cannot decode {', '.join(bad)} under {ds.train_dir}, chosen for fine-tuning")
    return torch.cat([x for x, _, _ in batches])


def labelled_folder(root: str, size: int, mean, std, *, seed: int = 0, workers: int = 4) -> ArrayDataset:
    """A labelled folder -- one sub-folder per class, its images at any depth below -- to evaluate
    a run on: each class's decodable images, in a seeded order, split in two, the first half
    (rounded up) the training part (kNN's bank, the probe's training set), the rest the test
    part; decoded once as the evaluation views them (``imagefiles.centre_view`` at ``size``), in
    memory. Files that cannot be decoded are skipped and listed in ``skipped``."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--val-dir: no such folder: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    files = [(os.path.join(c, f), k) for k, c in enumerate(classes) for f in imagefiles.scan(os.path.join(root, c))]
    if not files:
        raise FileNotFoundError(f"--val-dir: {root} has no class folders with images (give one "
                                "sub-folder per class)")
    images, skipped = [None] * len(files), {}
    for x, idx, bad in imagefiles.centre_batches(root, [f for f, _ in files], size, workers=workers):
        skipped.update({files[i][0]: why for i, why in bad.items()})
        for img, i in zip(x, idx.tolist()):
            images[i] = img.permute(1, 2, 0).numpy()
    parts = ([], [])
    for k in range(len(classes)):
        mine = [i for i, (_, c) in enumerate(files) if c == k and images[i] is not None]
        mine = [mine[j] for j in np.random.default_rng([seed, k, 0x7A1]).permutation(len(mine))]
        half = (len(mine) + 1) // 2
        parts[0].extend(mine[:half])
        parts[1].extend(mine[half:])
    if not parts[0] or not parts[1]:
        raise ValueError(f"--val-dir: {root} needs at least two decodable images")

    def arrays(ids):
        return (np.stack([images[i] for i in ids]), np.array([files[i][1] for i in ids], np.int64))
    note = (f"--val-dir {root}: {len(classes)} classes, each class's images in a seeded order (seed "
            f"{seed}), the first half (rounded up) the training part, the rest the test part")
    return ArrayDataset("val-dir", *arrays(parts[0]), *arrays(parts[1]), len(classes), tuple(mean),
                        tuple(std), note, skipped)
