"""Datasets, the model builder and the evaluation helpers of the training loop."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastclr.app import data, evaluate, models


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


@pytest.mark.parametrize("name, width, stem, size, feat", [
    ("resnet18", 8, True, 16, 64), ("resnet34", 4, True, 9, 32), ("resnet50", 4, False, 40, 128),
    ("resnet18", 64, False, 32, 512)])
def test_models(name, width, stem, size, feat):
    m = models.build_model(name, width=width, cifar_stem=stem, head_layers=3, proj_dim=16)
    h, z = m(torch.randn(3, 3, size, size))
    assert h.shape == (3, feat) and z.shape == (3, 16)
    if stem:
        assert isinstance(m.backbone.maxpool, torch.nn.Identity)
        assert m.backbone.conv1.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="name must be one of"):
        models.resnet_backbone("vgg")


def test_knn_matches_brute_force(seed):
    train, test = torch.randn(300, 12), torch.randn(40, 12)
    labels = torch.randint(0, 5, (300,))
    k, t = 17, 0.07
    scores = evaluate.knn_predict(train, labels, test, 5, k=k, temperature=t, chunk=7)
    sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    expect = torch.zeros(40, 5)
    for q in range(40):
        top = sim[q].argsort(descending=True)[:k]
        for j in top:
            expect[q, labels[j]] += torch.exp(sim[q, j] / t)
    torch.testing.assert_close(scores, expect, rtol=1e-4, atol=1e-5)


def test_knn_on_separable_clusters(seed):
    centres = torch.randn(4, 16) * 5
    ytr, yte = torch.arange(200) % 4, torch.arange(80) % 4
    xtr, xte = centres[ytr] + torch.randn(200, 16), centres[yte] + torch.randn(80, 16)
    assert evaluate.knn_accuracy(xtr, ytr, xte, yte, 4, k=20) == 1.0
    # the linear probe on the same data: tests/test_evaluate.py
