"""Datasets for ``python -m fastclr.train``.

Every dataset here is a train split and a held-out split of labelled images. The small ones live
in memory as uint8 arrays (N, H, W, 3); an image folder stays on disk.

- ``digits``: scikit-learn's bundled handwritten digits (1797 real 8x8 grey images, no
  download), split 80/20 stratified with a fixed seed, so every run evaluates on the same 360.
- ``cifar10`` / ``cifar100``: the python-pickle archives (``cifar-10-python.tar.gz`` or the
  folder it unpacks to) in ``data_dir``; never downloaded.
- ``imagefolder``: ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``.
- ``synthetic``: random images and labels, for throughput runs (evaluation is meaningless).
"""
from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass

import numpy as np
import torch

from .augment import CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD

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
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

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


def _digits() -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    grey = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    labels = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(rgb, labels, test_size=0.2, stratify=labels, random_state=0)
    mean = (float(xtr.mean() / 255),) * 3
    std = (float(xtr.std() / 255),) * 3
    return ArrayDataset("digits", np.ascontiguousarray(xtr), ytr, np.ascontiguousarray(xte), yte,
                        10, mean, std)


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
    return ArrayDataset(name, xtr, ytr, xte, yte, classes, CIFAR_MEAN, CIFAR_STD)


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
    return FolderDataset("imagefolder", data_dir, len(classes))


def _synthetic(n: int, size: int) -> ArrayDataset:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.int64)
    k = max(1, n // 10)
    return ArrayDataset("synthetic", x[k:], y[k:], x[:k], y[:k], 10, IMAGENET_MEAN, IMAGENET_STD)


def shard_indices(n: int, global_batch: int, local: int, rank: int, seed: int, epoch: int,
                  start: int = 0):
    """Yields this rank's indices of global batches ``start..n // global_batch - 1`` of ``epoch``:
    the permutation drawn from ``(seed, epoch)``, global batch ``k`` its slice
    ``[k B, (k + 1) B)``, rank ``r`` the ``r``-th ``local``-sized part of that."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    for k in range(start, n // global_batch):
        lo = k * global_batch + rank * local
        yield perm[lo:lo + local]


class ArrayBatches:
    """Global batches of an in-memory dataset, deterministic and resumable.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; global batch ``k`` is its slice
    ``[k B, (k + 1) B)`` and rank ``r`` of ``W`` takes the ``r``-th of the ``W`` equal parts of it.
    So ``W`` processes of ``B / W`` images see exactly the images one process of ``B`` sees, and a
    resumed run picks up at any batch. The last partial batch is dropped (the loss wants full
    batches).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, global_batch: int, *, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ValueError(f"the global batch ({global_batch}) must be a multiple of the number of "
                             f"processes ({world_size})")
        if global_batch > len(images):
            raise ValueError(f"--batch-size {global_batch} is larger than the training set "
                             f"({len(images)} images)")
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels)
        self.global_batch, self.seed = global_batch, seed
        self.local = global_batch // world_size
        self.rank = rank

    def __len__(self) -> int:
        return len(self.images) // self.global_batch

    def epoch(self, epoch: int, start: int = 0):
        """Yields ``(uint8 (b, 3, H, W), labels (b,))`` for batches ``start..len-1`` of ``epoch``."""
        for idx in shard_indices(len(self.images), self.global_batch, self.local, self.rank,
                                 self.seed, epoch, start):
            yield self.images[idx].permute(0, 3, 1, 2), self.labels[idx]


def eval_arrays(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> uint8 (N, 3, size, size), resized (bilinear, antialiased) if needed."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    if x.shape[-1] == size and x.shape[-2] == size:
        return x.contiguous()
    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)
