"""Fashion-MNIST's files: the IDX format (LeCun's MNIST format), gzipped or not.

An IDX file is a 4-byte magic number (two zero bytes, the element type -- 0x08 for unsigned
bytes -- and the number of dimensions), one big-endian uint32 per dimension, then the elements.
torchvision's reader (``torchvision.datasets.mnist.read_sn3_pascalvincent_tensor``) takes
uncompressed files only and stops on a bad one with a bare ``assert``; the files as published,
and as Debian installs them, are gzipped. So this reader opens either, checks the header against
what the file should hold, and says what is wrong with a bad file in one line.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

FASHION_MNIST_FILES = {  # split -> (images, labels), without the .gz their published names have
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
TORCHVISION_SUBDIR = os.path.join("FashionMNIST", "raw")  # under torchvision's root
WHERE_TO_GET = ("install it (Debian/Ubuntu: apt-get install dataset-fashion-mnist, into "
                f"{DEBIAN_DIR}), or download it with torchvision "
                "(torchvision.datasets.FashionMNIST(ROOT, download=True), then --data-dir ROOT), "
                "or fetch the four files from https://github.com/zalandoresearch/fashion-mnist")
_UBYTE = 0x08


class IdxError(ValueError):
    """A file that is not the IDX file it should be (the message names it and what is wrong)."""


def read_idx(path: str, dims: int) -> np.ndarray:
    """The uint8 array of ``dims`` dimensions in the IDX file ``path`` (gzipped or not)."""
    data = _read_bytes(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != _UBYTE or data[3] != dims:
        got = f"0x{data[:4].hex()}" if len(data) >= 4 else f"missing (the file has {len(data)} bytes)"
        raise IdxError(f"{path} is not an IDX file of {dims}-d unsigned bytes: its magic number is "
                       f"{got}, expected 0x000008{dims:02x}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise IdxError(f"{path} is truncated: it ends inside its header ({len(data)} bytes)")
    shape = struct.unpack(f">{dims}I", data[4:header])
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        what = "is truncated" if len(data) < expected else "has trailing bytes"
        raise IdxError(f"{path} {what}: its header says {' x '.join(map(str, shape))} "
                       f"({expected} bytes with the header), the file holds {len(data)}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if not gzipped:
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise IdxError(f"{path} is a damaged gzip file ({exc}); truncated by a download?") from None


def find_file(folders, name: str) -> str | None:
    """``name`` or ``name.gz`` in the first of ``folders`` that holds it."""
    for folder in folders:
        for candidate in (name, name + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def fashion_mnist_folders(data_dir: str | None) -> list:
    """Where the files are looked for: ``data_dir`` itself and torchvision's layout under it;
    without it, Debian's package, then torchvision's layout under ./data."""
    if data_dir is not None:
        return [data_dir, os.path.join(data_dir, TORCHVISION_SUBDIR)]
    return [DEBIAN_DIR, os.path.join("data", TORCHVISION_SUBDIR)]


def read_fashion_mnist(data_dir: str | None) -> dict:
    """``{"train": (images (60000, 28, 28), labels (60000,)), "test": ...}`` as uint8 arrays."""
    folders = fashion_mnist_folders(data_dir)
    out = {}
    for split, (image_name, label_name) in FASHION_MNIST_FILES.items():
        paths = [find_file(folders, name) for name in (image_name, label_name)]
        missing = [name for name, path in zip((image_name, label_name), paths) if path is None]
        if missing:
            raise FileNotFoundError(
                f"fashion-mnist: {' and '.join(n + '[.gz]' for n in missing)} not found in "
                f"{' or '.join(folders)}; {WHERE_TO_GET}")
        images, labels = read_idx(paths[0], 3), read_idx(paths[1], 1)
        if len(images) != len(labels):
            raise IdxError(f"fashion-mnist: {paths[0]} holds {len(images)} images but {paths[1]} "
                           f"{len(labels)} labels; the two files are from different releases or one "
                           "is damaged")
        if labels.size and labels.max() > 9:
            raise IdxError(f"fashion-mnist: {paths[1]} has label {labels.max()}; Fashion-MNIST's are 0-9")
        out[split] = images, labels
    return out
