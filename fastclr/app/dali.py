"""SimCLR's two-view augmentation as an NVIDIA DALI pipeline (``dali_loader``): images from
memory or a folder (decoded on the GPU), every random parameter per sample, in the training
loop's batch order (``sampling.BatchOrder``). DALI itself is imported when a loader is built;
``device="cpu"`` runs it without a GPU."""
from __future__ import annotations

import contextlib

import torch

from .augment import IMAGENET_MEAN, IMAGENET_STD
from .sampling import BatchOrder

def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class _OrderedSource:
    """DALI external_source callback: batch ``iteration`` of DALI's epoch ``epoch_idx`` is
    batch ``start_batch + iteration`` (first epoch) or ``iteration`` (later ones) of epoch
    ``start_epoch + epoch_idx`` in ``fastclr.app.sampling.BatchOrder`` -- the training loop's scheme --,
    read by ``load(indices)``; StopIteration at the end of each epoch."""

    def __init__(self, order, load, start_epoch, start_batch):
        self.order, self.load = order, load
        self.start_epoch, self.start_batch = start_epoch, start_batch

    def __call__(self, info):
        k = info.iteration + (self.start_batch if info.epoch_idx == 0 else 0)
        if k >= len(self.order):
            raise StopIteration
        idx = self.order.batch(self.start_epoch + info.epoch_idx, k)
        if len(idx) == 0:
            raise StopIteration
        return self.load(idx.tolist())


def _dali_view(images, size, strength, blur, solarize, scale=(0.08, 1.0), flip=0.5):
    """One SimCLR view of a batch of HWC uint8 images, every parameter per sample."""
    from nvidia.dali import fn, types
    x = fn.random_resized_crop(images, size=[size, size], random_area=list(scale),
                               random_aspect_ratio=[3 / 4, 4 / 3])
    if flip > 0:
        x = fn.flip(x, horizontal=fn.random.coin_flip(probability=flip))
    if fn.random.coin_flip(probability=0.8, dtype=types.BOOL):
        s = 0.8 * strength
        x = fn.color_twist(x, brightness=fn.random.uniform(range=[1 - s, 1 + s]),
                           contrast=fn.random.uniform(range=[1 - s, 1 + s]),
                           saturation=fn.random.uniform(range=[1 - s, 1 + s]),
                           hue=fn.random.uniform(range=[-72 * strength, 72 * strength]))  # 0.2 s turn, degrees
    if fn.random.coin_flip(probability=0.2, dtype=types.BOOL):
        x = fn.color_twist(x, saturation=0.0)
    if blur and fn.random.coin_flip(probability=0.5, dtype=types.BOOL):
        x = fn.gaussian_blur(x, window_size=max(3, int(round(0.1 * size)) // 2 * 2 + 1),
                             sigma=fn.random.uniform(range=[0.1, 2.0]))
    if solarize > 0 and fn.random.coin_flip(probability=solarize, dtype=types.BOOL):
        hi = fn.cast(x >= 128, dtype=types.UINT8)
        x = fn.cast(hi * (255 - x) + (1 - hi) * x, dtype=types.UINT8)
    return x


def dali_loader(source, batch_size: int, size: int, *, device: str = "gpu", labels=None,
                strength: float = 0.5, blur: bool | None = None, solarize: float = 0.0,
                mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype: torch.dtype = torch.float32,
                channels_last: bool = False, seed: int = 0, shard_id: int = 0,
                num_shards: int = 1, drop_last: bool = True, num_threads: int = 2,
                scale=(0.08, 1.0), flip: float = 0.5, views: int = 2, start_epoch: int = 0,
                start_batch: int = 0):
    """A DALI pipeline and iterator yielding ``(view_1, ..., view_views, labels)`` torch tensors
    (NCHW, normalised, ``dtype``) on the training device, one pass per epoch (iterate again for
    the next epoch).

    ``source``: an in-memory uint8 array (N, H, W, 3) (with ``labels`` (N,) or none), or the
    path of a folder of class folders of JPEG/PNG images (``torchvision.datasets.ImageFolder``'s
    files and labels; decoded on the GPU, "mixed", when ``device="gpu"``). Either way the images
    come through external_source in ``fastclr.app.sampling.BatchOrder`` -- the training loop's shuffle
    and sharding: epoch ``e``'s permutation from ``(seed, e)``, shard ``shard_id`` of
    ``num_shards`` taking its part of every global batch of ``num_shards x batch_size`` --, the
    first pass being epoch ``start_epoch`` from batch ``start_batch`` (to resume a run).
    ``device="cpu"`` runs DALI without a GPU (device_id=None).
    """
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    _check_dali_args(device, batch_size, size, shard_id, num_shards, dtype, views)
    blur = size >= 96 if blur is None else bool(blur)
    out_type = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16,
                torch.bfloat16: types.FLOAT}[dtype]  # bfloat16: cast after DALI
    gpu = device == "gpu"
    root, n, load = _dali_source(source, labels)
    order = BatchOrder(n, batch_size * num_shards, seed=seed, rank=shard_id, world_size=num_shards,
                       drop_last=drop_last)
    callback = _OrderedSource(order, load, start_epoch, start_batch)

    @pipeline_def(enable_conditionals=True)
    def pipe():
        imgs, labs = fn.external_source(source=callback, num_outputs=2, batch=True, batch_info=True,
                                        dtype=[types.UINT8, types.INT64],
                                        layout=["HWC" if root is None else "", ""])
        if root is not None:
            imgs = fn.decoders.image(imgs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        elif gpu:
            imgs = imgs.gpu()
        out = []
        for _ in range(views):
            v = _dali_view(imgs, size, strength, blur, solarize, scale, flip)
            out.append(fn.crop_mirror_normalize(v, dtype=out_type, output_layout="CHW",
                                                mean=[255 * m for m in mean],
                                                std=[255 * s for s in std]))
        return (*out, labs)

    pipeline = pipe(batch_size=batch_size, num_threads=num_threads,
                    device_id=torch.cuda.current_device() if gpu else None,
                    seed=seed + 7919 * shard_id + 104729 * start_epoch, exec_dynamic=True)
    pipeline.build()
    names = [f"view{i + 1}" for i in range(views)] + ["labels"]
    policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
    with _naming_undecodable_files(root):  # the iterator runs its first batches right away
        it = DALIGenericIterator(pipeline, names, auto_reset=True, last_batch_policy=policy)
    return _DaliTorchLoader(it, names, dtype, channels_last, root, len(order))


def _check_dali_args(device, batch_size, size, shard_id, num_shards, dtype, views):
    if device not in ("gpu", "cpu"):
        raise ValueError(f"dali_loader: device must be 'gpu' or 'cpu', got {device!r}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"dali_loader: need 0 <= shard_id < num_shards, got {shard_id} of {num_shards}")
    if batch_size < 1 or size < 1 or views < 1:
        raise ValueError(f"dali_loader: batch_size, size and views must be >= 1, got {batch_size}, "
                         f"{size}, {views}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"dali_loader: dtype must be float32, bfloat16 or float16, got {dtype}")


def _dali_source(source, labels):
    """(folder root or None, number of images, load(indices) -> (images, labels) lists)."""
    import os

    import numpy as np
    if isinstance(source, (str, os.PathLike)):
        root = os.fspath(source)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dali_loader: no such image folder: {root}")
        import torchvision
        samples = torchvision.datasets.ImageFolder(root).samples

        def load(idx):
            return ([np.fromfile(samples[i][0], dtype=np.uint8) for i in idx],
                    [np.array([samples[i][1]], np.int64) for i in idx])
        return root, len(samples), load
    images = np.asarray(source)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError("dali_loader: an array source must be uint8 (N, H, W, 3), got "
                         f"{images.dtype} {images.shape}")
    lab = np.zeros(len(images), np.int64) if labels is None else np.asarray(labels, np.int64)
    if len(lab) != len(images):
        raise ValueError(f"dali_loader: {len(lab)} labels for {len(images)} images")

    def load(idx):
        return ([np.ascontiguousarray(images[i]) for i in idx], [lab[i:i + 1] for i in idx])
    return None, len(images), load


def _undecodable_files(root: str, limit: int = 10) -> list:
    """Image files under root that PIL cannot decode (the first `limit`)."""
    import os

    from PIL import Image
    bad = []
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                with Image.open(path) as img:
                    img.load()
            except Exception:  # noqa: BLE001 - any failure to decode is what we are looking for
                bad.append(path)
                if len(bad) >= limit:
                    return bad
    return bad


@contextlib.contextmanager
def _naming_undecodable_files(root: str):
    """Re-raises DALI's decoding failure (which names no file) naming the files at fault."""
    try:
        yield
    except RuntimeError as exc:
        if root is None or "decod" not in str(exc).lower():
            raise
        bad = _undecodable_files(root)
        if not bad:
            raise
        more = f" (and {len(bad) - 1} more: {', '.join(bad[1:])})" if len(bad) > 1 else ""
        raise RuntimeError(f"dali_loader: cannot decode {bad[0]}{more}; remove or replace the "
                           "file(s)") from exc


class _DaliTorchLoader:
    """(view_1, ..., view_V, labels) batches from a DALIGenericIterator; labels as a (B,) int64.
    A decoding failure is re-raised naming the files that cannot be decoded (DALI's own message
    does not)."""

    def __init__(self, iterator, names, dtype, channels_last, root, batches):
        self.iterator, self.names, self.dtype, self.root = iterator, names, dtype, root
        self.channels_last, self.batches = channels_last, batches

    def __len__(self):
        """Batches of a whole epoch (a first epoch resumed at ``start_batch`` has fewer)."""
        return self.batches

    def __iter__(self):
        with _naming_undecodable_files(self.root):
            yield from self._batches()

    def _batches(self):
        for batch in self.iterator:
            out = batch[0]
            views = [out[name] for name in self.names[:-1]]
            if self.dtype == torch.bfloat16:
                views = [v.to(torch.bfloat16) for v in views]
            if self.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            yield (*views, out["labels"].reshape(-1).long())
