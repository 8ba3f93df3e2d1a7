"""The datasets (fastclr/app/data.py) and their batches in the one batch order (sampling.py)."""
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from fastclr.app import data


def test_digits_split():
    ds = data.load_dataset("digits")
    assert ds.train_images.shape == (1437, 8, 8, 3) and ds.test_images.shape == (360, 8, 8, 3)
    assert ds.train_images.dtype == np.uint8 and ds.train_images.max() == 255
    assert np.bincount(ds.test_labels).min() >= 35  # stratified
    again = data.load_dataset("digits")
    assert np.array_equal(again.test_labels, ds.test_labels)  # the same held-out split every run
    # its own training split's statistics, as export records them without the images
    assert (ds.mean, ds.std) == data.normalisation("digits")
    assert ds.mean == (ds.train_images.mean() / 255,) * 3 and ds.std == (ds.train_images.std() / 255,) * 3


def _cifar_batch(n, rng, key):
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: list(rng.integers(0, 10, n))}


@pytest.mark.parametrize("form", ["folder", "tar"])
def test_cifar10_archive_forms(tmp_path, form):
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": _cifar_batch(7, rng, b"labels") for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(5, rng, b"labels")
    if form == "folder":
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        for name, b in batches.items():
            (folder / name).write_bytes(pickle.dumps(b))
    else:
        with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
            for name, b in batches.items():
                raw = pickle.dumps(b)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    ds = data.load_dataset("cifar10", str(tmp_path))
    assert ds.train_images.shape == (35, 32, 32, 3) and ds.test_images.shape == (5, 32, 32, 3)
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(ds.train_images[0], first)
    assert list(ds.test_labels) == list(batches["test_batch"][b"labels"])


def test_missing_datasets_say_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python.tar.gz.*never downloads"):
        data.load_dataset("cifar100", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train/"):
        data.load_dataset("imagefolder", str(tmp_path))
    with pytest.raises(ValueError, match="--dataset must be one of"):
        data.load_dataset("mnist")


def test_array_batches_shard_the_global_batch():
    ds = data.load_dataset("synthetic", synthetic_size=300)
    one = data.ArrayBatches(ds.train_images, ds.train_labels, 60, seed=3)
    two = [data.ArrayBatches(ds.train_images, ds.train_labels, 60, seed=3, rank=r, world_size=2)
           for r in range(2)]
    assert len(one) == len(two[0]) == 270 // 60
    for (x, y), (x0, y0), (x1, y1) in zip(one.epoch(1), two[0].epoch(1), two[1].epoch(1)):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    resumed = list(one.epoch(1, start=2))
    assert torch.equal(resumed[0][0], list(one.epoch(1))[2][0])
    assert not torch.equal(next(one.epoch(0))[0], next(one.epoch(1))[0])  # reshuffled per epoch
