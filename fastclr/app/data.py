"""Datasets for ``python -m fastclr.train``.

Every dataset here is a train split and a held-out split of labelled images. The small ones live
in memory as uint8 arrays (N, H, W, 3); an image folder stays on disk.

- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 grey images, no
  download), split 80/20 stratified with a fixed seed, so every run evaluates on the same 360.
- ``cifar10`` / ``cifar100``: the python-pickle archives (``cifar-10-python.tar.gz`` or the
  folder it unpacks to) in ``data_dir``; never downloaded.
- ``imagefolder``: ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``.
- ``synthetic``: random images and labels, for throughput runs (evaluation is meaningless).

The training loop takes its batches from here through one interface, ``train_batches`` (an
object with ``len()`` = steps per epoch and ``epoch(e, start)`` yielding ``(x, labels)``), and
every source -- in-memory arrays, an image folder through DataLoader workers, DALI -- orders an
epoch by one scheme, ``BatchOrder``: so a run resumed at any batch sees the same images in the
same order as an uninterrupted one, whichever source it uses, on any number of processes.
"""
from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass

import numpy as np
import torch

from . import augment
from .augment import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD  # noqa: F401 - re-exported

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
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
                 synthetic_image_size: int = 32):
    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {DATASETS}, got {name!r}")
    if name == "digits":
        return _digits()
    if name in _CIFAR:
        return _cifar(name, data_dir)
    if name == "imagefolder":
        return _folder(data_dir)
    return _synthetic(synthetic_size, synthetic_image_size)


def normalisation(name: str) -> tuple:
    """(mean, std) per channel that dataset ``name``'s images are normalised with: CIFAR's usual
    values, the digits' own training-split statistics, ImageNet's for every other dataset. The one
    place that decides it (training, evaluation, and export's record read it), without CIFAR's files."""
    if name in _CIFAR:
        return CIFAR_MEAN, CIFAR_STD
    if name == "digits":
        return _own_statistics(_digits_split()[0])
    return IMAGENET_MEAN, IMAGENET_STD


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


class BatchOrder:
    """The one shuffle/shard scheme of every training source.

    Epoch ``e`` is the permutation of ``range(n)`` drawn from ``(seed, e)``; global batch ``k``
    is its slice ``[k B, (k + 1) B)`` and rank ``r`` of ``W`` takes the ``r``-th of the ``W``
    equal parts of it. So ``W`` processes of ``B / W`` images see exactly the images one
    process of ``B`` sees, and a run resumed at any batch sees what an uninterrupted one does.
    ``drop_last`` (the training loop's choice: the loss wants full batches) drops the last
    partial global batch; otherwise it is kept (rank by rank, as far as it reaches).
    """

    def __init__(self, n: int, global_batch: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True):
        if global_batch < 1 or global_batch % world_size:
            raise ValueError(f"the global batch ({global_batch}) must be a positive multiple of the "
                             f"number of processes ({world_size})")
        if drop_last and global_batch > n:
            raise ValueError(f"--batch-size {global_batch} is larger than the training set ({n} images)")
        self.n, self.global_batch, self.seed, self.rank = n, global_batch, seed, rank
        self.local = global_batch // world_size
        self.drop_last = drop_last
        self._perm = (None, None)

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def batch(self, epoch: int, k: int) -> torch.Tensor:
        """This rank's indices (int64) of global batch ``k`` of ``epoch`` (maybe empty at the
        end of an epoch without drop_last)."""
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        lo = k * self.global_batch + self.rank * self.local
        return self._perm[1][lo:min(lo + self.local, (k + 1) * self.global_batch)]

    def epoch(self, epoch: int, start: int = 0):
        """This rank's index tensors of batches ``start..len-1`` of ``epoch``."""
        for k in range(start, len(self)):
            yield self.batch(epoch, k)


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


class FolderBatches:
    """Training batches of an image folder in ``BatchOrder``: decoded and resized to a
    ``size``-pixel square in DataLoader workers (the loop augments them), same interface as
    ``ArrayBatches``. The files are ``torchvision.datasets.ImageFolder``'s, in its order."""

    augmented = False

    def __init__(self, root: str, size: int, global_batch: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, workers: int = 4):
        import torchvision
        from torchvision.transforms import v2 as T
        self.ds = torchvision.datasets.ImageFolder(
            root, transform=T.Compose([T.Resize((size, size), antialias=True), T.PILToTensor()]))
        self.order = BatchOrder(len(self.ds), global_batch, seed=seed, rank=rank, world_size=world_size)
        self.workers = workers

    def __len__(self) -> int:
        return len(self.order)

    def epoch(self, epoch: int, start: int = 0):
        batches = list(self.order.epoch(epoch, start))
        if not batches:
            return
        loader = torch.utils.data.DataLoader(self.ds, batch_sampler=[b.tolist() for b in batches],
                                             num_workers=self.workers,
                                             pin_memory=torch.cuda.is_available())
        yield from loader


class DaliBatches:
    """Training batches augmented by DALI (``fastclr.app.augment.dali_loader``) in ``BatchOrder``:
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
            self.loader = augment.dali_loader(
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
                  workers: int = 4, size: int = 32, dali: dict | None = None):
    """The training batches of ``ds`` for one process: ``ArrayBatches`` / ``FolderBatches``
    (uint8 images for the loop's torch augmentation), or ``DaliBatches`` when ``dali`` holds
    ``dali_loader``'s augmentation arguments. All in ``BatchOrder``."""
    kw = dict(seed=seed, rank=rank, world_size=world_size)
    if dali is not None:
        source = ds.train_images if isinstance(ds, ArrayDataset) else ds.train_dir
        labels = ds.train_labels if isinstance(ds, ArrayDataset) else None
        return DaliBatches(source, global_batch, labels=labels, size=size, mean=ds.mean,
                           std=ds.std, **kw, **dali)
    if isinstance(ds, ArrayDataset):
        return ArrayBatches(ds.train_images, ds.train_labels, global_batch, **kw)
    return FolderBatches(ds.train_dir, int(round(size * 256 / 224)), global_batch, workers=workers, **kw)


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
    import torchvision
    from torchvision.transforms import v2 as T
    folder = torchvision.datasets.ImageFolder(
        ds.train_dir if split == "train" else ds.val_dir,
        transform=T.Compose([T.Resize(int(round(size * 256 / 224)), antialias=True),
                             T.CenterCrop(size), T.PILToTensor()]))
    yield from torch.utils.data.DataLoader(folder, batch_size=batch, num_workers=workers)


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
    import torchvision
    from torchvision.transforms import v2 as T
    folder = torchvision.datasets.ImageFolder(
        ds.train_dir, transform=T.Compose([T.Resize(int(round(size * 256 / 224)), antialias=True),
                                           T.CenterCrop(size), T.PILToTensor()]))
    return torch.stack([folder[int(i)][0] for i in indices])
