"""Image files as SimCLR reads them: found at any depth, decoded to RGB whatever their mode, a file
that cannot be decoded named (``BadImage``), and the random resized crop taken from the decoded
original (torchvision's sampling: the crop box first, then one resize of that box).

Decoding (PIL): JPEG, PNG, WebP, BMP, TIFF, GIF (its first frame) and whatever else PIL reads;
the EXIF orientation applied; grey and 16-bit grey scaled to 8 bits and repeated over the three
channels; a palette through its RGB(A) colours; an alpha channel composited onto white (what a
viewer shows); CMYK converted by PIL. A file is bad when PIL cannot identify or fully decode it
(truncated, corrupt, empty, not an image), or when it is larger than PIL's decompression-bomb
limit (``Image.MAX_IMAGE_PIXELS``, 89 M pixels) -- never decoded partially.
"""
from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")


class BadImage(Exception):
    """A file that cannot be decoded as an image; ``str()`` says why."""


def scan(root: str) -> list:
    """Every image file under ``root`` (by extension, at any depth, hidden files and folders
    left out), as paths relative to ``root``, sorted: the same list on every machine."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no such image folder: {root}")
    found = []
    for folder, dirs, names in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, root)
        found += [os.path.normpath(os.path.join(rel, n)) for n in names
                  if not n.startswith(".") and n.lower().endswith(EXTENSIONS)]
    return sorted(found)


def decode(path: str) -> Image.Image:
    """The image at ``path`` as an RGB PIL image, upright (EXIF orientation applied); BadImage
    when it cannot be decoded whole."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()  # decodes everything: a truncated file fails here, not later
                return _rgb(ImageOps.exif_transpose(img))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning, EOFError) as exc:
        raise BadImage(f"{type(exc).__name__}: {exc}") from None


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit) grey: the top 8 bits
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def crop_box(rng: np.random.Generator, width: int, height: int, scale=(0.08, 1.0),
             ratio=(3 / 4, 4 / 3)) -> tuple:
    """(left, top, w, h) of a random resized crop of a ``width`` x ``height`` image, as
    torchvision's RandomResizedCrop draws it: an area fraction in ``scale`` and a log-uniform
    aspect ratio in ``ratio``, 10 tries, then the central crop of the closest allowed ratio."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        r = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * r))), int(round(math.sqrt(target / r)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resized_crop(img: Image.Image, box: tuple, size: int) -> np.ndarray:
    """The ``box`` (left, top, w, h) of ``img`` resized to ``size`` x ``size`` (bilinear,
    antialiased when shrinking), as uint8 (size, size, 3)."""
    left, top, w, h = box
    out = img.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h),
                     reducing_gap=None)
    return np.asarray(out, dtype=np.uint8)


def centre_view(img: Image.Image, size: int) -> np.ndarray:
    """The evaluation's view of an image: the short side resized to ``size`` x 256/224, the
    centre ``size`` x ``size`` square kept; uint8 (size, size, 3)."""
    short = max(size, int(round(size * 256 / 224)))
    scale = short / min(img.width, img.height)
    w, h = max(size, int(round(img.width * scale))), max(size, int(round(img.height * scale)))
    left, top = (w - size) // 2, (h - size) // 2
    # one resize of the box that becomes the centre square (antialiased when shrinking)
    box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=box, reducing_gap=None), dtype=np.uint8)


class CentreViews(torch.utils.data.Dataset):
    """Image ``i`` of ``files`` (relative to ``root``) as the evaluation views it, uint8
    (3, S, S) (``centre_view``), with ``i`` and ``""`` -- or zeros, ``i`` and why it is bad."""

    def __init__(self, root: str, files: list, size: int):
        self.root, self.files, self.size = root, files, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            img = decode(os.path.join(self.root, self.files[i]))
        except BadImage as exc:
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), i, str(exc)
        return torch.from_numpy(centre_view(img, self.size).transpose(2, 0, 1).copy()), i, ""


def centre_batches(root: str, files: list, size: int, *, batch: int = 256, workers: int = 4, progress=None):
    """``files`` (relative to ``root``) as the evaluation views them, decoded in ``workers``
    DataLoader processes: yields ``(uint8 (b, 3, S, S), their indices (b,), {index: why} of the
    batch's files that cannot be decoded)`` -- the bad ones left out of the images. ``progress``:
    a function wrapping the loader (a progress bar)."""
    loader = torch.utils.data.DataLoader(CentreViews(root, files, size), batch_size=batch, num_workers=workers)
    for x, idx, why in (progress or iter)(loader):
        ok = torch.tensor([not w for w in why], dtype=torch.bool)
        yield x[ok], idx[ok], {i: w for i, w in zip(idx.tolist(), why) if w}
