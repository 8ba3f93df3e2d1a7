"""The torch SimCLR augmentation: shapes, per-sample randomness, parameter statistics."""
import math

import pytest
import torch

from fastclr.app.augment import CIFAR_MEAN, CIFAR_STD, TorchSimCLRAugment

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def images(b, h=32, w=32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8).to(device)


def within(rate, p, n, sigmas=5):
    """A Bernoulli(p) rate over n draws, within `sigmas` standard deviations."""
    return abs(rate - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_dtypes_layouts(device, dtype):
    aug = TorchSimCLRAugment(24, dtype=dtype, channels_last=True)
    for x in (images(5, 40, 30, device), images(5, 40, 30, device).permute(0, 3, 1, 2)):
        v1, v2 = aug(x)
        assert v1.shape == v2.shape == (5, 3, 24, 24)
        assert v1.dtype == dtype and v1.device.type == device
        assert v1.is_contiguous(memory_format=torch.channels_last)


def test_normalisation_maps_back_into_unit_range():
    aug = TorchSimCLRAugment(16, mean=CIFAR_MEAN, std=CIFAR_STD)
    v1, _ = aug(images(64))
    raw = v1 * torch.tensor(CIFAR_STD)[None, :, None, None] + torch.tensor(CIFAR_MEAN)[None, :, None, None]
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    assert raw.std() > 0.05  # not collapsed


@pytest.mark.parametrize("device", DEVICES)
def test_views_differ_and_identical_images_give_different_outputs(device):
    aug = TorchSimCLRAugment(32, blur=True)
    same = images(1, device=device).expand(16, -1, -1, -1)
    v1, v2 = aug(same)
    outs = torch.cat([v1, v2]).flatten(1)
    d = torch.cdist(outs, outs)
    off_diag = d[~torch.eye(32, dtype=torch.bool, device=device)]
    assert off_diag.min() > 1e-3, "per-sample parameters: no two outputs may coincide"


def test_fixed_seed_gives_identical_output():
    aug = TorchSimCLRAugment(32, blur=True, solarize=0.2)
    x = images(8)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_parameter_rates_per_sample():
    n = 4000  # 2n views
    aug = TorchSimCLRAugment(96, solarize=0.3)  # blur on at 96
    _, _, p = aug(images(n, 8, 8), torch.Generator().manual_seed(0), return_params=True)
    m = 2 * n
    assert within(p["flip"].float().mean().item(), 0.5, m)
    assert within(p["jitter"].float().mean().item(), 0.8, m)
    assert within(p["grayscale"].float().mean().item(), 0.2, m)
    assert within(p["blur"].float().mean().item(), 0.5, m)
    assert within(p["solarize"].float().mean().item(), 0.3, m)
    sig = p["blur_sigma"]
    assert sig.min() >= 0.1 and sig.max() <= 2.0 and abs(sig.mean().item() - 1.05) < 0.05
    for key, lo, hi in (("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4), ("saturation", 0.6, 1.4),
                        ("hue", -0.1, 0.1)):
        v = p[key]
        assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6
        assert abs(v.mean().item() - (lo + hi) / 2) < 0.02 * (hi - lo) + 0.01
    # all 24 orders of the four jitter factors occur
    assert len({tuple(o) for o in p["jitter_order"].tolist()}) == 24


def test_crop_areas_follow_torchvision_sampling():
    """Same distribution of crop areas and ratios as torchvision's RandomResizedCrop."""
    tv = pytest.importorskip("torchvision.transforms")
    h, w, n = 60, 80, 3000
    aug = TorchSimCLRAugment(32)
    _, _, p = aug(images(n, h, w), torch.Generator().manual_seed(1), return_params=True)
    ours = (p["crop_w"] * p["crop_h"] / (h * w)).double()
    torch.manual_seed(1)
    img = torch.zeros(3, h, w)
    theirs = torch.tensor([(lambda t: t[2] * t[3] / (h * w))(
        tv.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))) for _ in range(2 * n)],
        dtype=torch.float64)
    assert ours.min() >= 0.07 and ours.max() <= 1.0
    se = math.sqrt(ours.var().item() / ours.numel() + theirs.var().item() / theirs.numel())
    assert abs(ours.mean().item() - theirs.mean().item()) < 5 * se
    for q in (0.1, 0.5, 0.9):
        assert abs(ours.quantile(q).item() - theirs.quantile(q).item()) < 0.03
    ratio = p["crop_w"] / p["crop_h"]
    assert ratio.min() >= 3 / 4 - 0.1 and ratio.max() <= 4 / 3 + 0.1  # rounding to pixels
    assert (p["crop_x"] >= 0).all() and (p["crop_x"] + p["crop_w"] <= w).all()
    assert (p["crop_y"] >= 0).all() and (p["crop_y"] + p["crop_h"] <= h).all()


def test_flip_and_crop_geometry():
    """A full-image crop of a horizontal ramp comes out as the ramp, mirrored when flipped."""
    aug = TorchSimCLRAugment(16, strength=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                             mean=(0, 0, 0), std=(1, 1, 1))
    ramp = torch.linspace(0, 255, 16).round().to(torch.uint8)
    x = ramp[None, None, :, None].expand(64, 16, 16, 3).contiguous()
    v1, v2, p = aug(x, torch.Generator().manual_seed(0), return_params=True)
    out = torch.cat([v1, v2])
    gray = p["grayscale"]
    expected = ramp.float() / 255
    for i in range(128):
        row = out[i, 0, 8]
        target = expected.flip(0) if p["flip"][i] else expected
        if not gray[i]:
            torch.testing.assert_close(row, target, atol=1e-5, rtol=0)


def test_zero_strength_jitter_is_identity():
    aug = TorchSimCLRAugment(8, strength=0.0)
    x = images(4, 8, 8).permute(0, 3, 1, 2).float() / 255
    # strength 0: the jitter is the identity
    params = {}
    y = aug._colour(x.clone(), torch.Generator().manual_seed(0), params)
    keep = ~params["grayscale"]
    torch.testing.assert_close(y[keep], x[keep])


@pytest.mark.parametrize("bad,exc", [(dict(size=0), ValueError), (dict(size=32, strength=-1), ValueError),
                                     (dict(size=32, solarize=2), ValueError),
                                     (dict(size=32, dtype=torch.int8), TypeError)])
def test_bad_arguments(bad, exc):
    with pytest.raises(exc):
        TorchSimCLRAugment(**bad)


def test_bad_images():
    aug = TorchSimCLRAugment(8)
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.rand(2, 8, 8, 3))
    with pytest.raises(ValueError, match="shape"):
        aug(torch.zeros(2, 8, 8, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="empty"):
        aug(torch.zeros(0, 8, 8, 3, dtype=torch.uint8))


# --- DALI, CPU-only mode (device_id=None): what CI can run -----------------------------------

dali = pytest.mark.skipif(not __import__("fastclr.app.dali", fromlist=["x"]).dali_available(),
                          reason="nvidia-dali not installed")


def _np_images(n, h=32, w=32, seed=0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@dali
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dali_cpu_shapes_views_and_labels(dtype):
    from fastclr.app.dali import dali_loader
    import numpy as np
    loader = dali_loader(_np_images(100), 16, 24, device="cpu", labels=np.arange(100), dtype=dtype,
                         mean=CIFAR_MEAN, std=CIFAR_STD, channels_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == 6  # drop_last: 100 // 16
    v1, v2, lab = batches[0]
    assert v1.shape == v2.shape == (16, 3, 24, 24) and v1.dtype == dtype and lab.shape == (16,)
    assert v1.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(v1, v2)
    raw = v1.float() * torch.tensor(CIFAR_STD)[:, None, None] + torch.tensor(CIFAR_MEAN)[:, None, None]
    assert raw.min() >= -0.02 and raw.max() <= 1.02


@dali
def test_dali_identical_images_give_different_outputs():
    from fastclr.app.dali import dali_loader
    same = _np_images(1).repeat(16, axis=0)
    v1, v2, _ = next(iter(dali_loader(same, 16, 32, device="cpu")))
    outs = torch.cat([v1, v2]).flatten(1)
    d = torch.cdist(outs, outs)
    assert d[~torch.eye(32, dtype=torch.bool)].min() > 1e-3


@dali
def test_dali_same_seed_same_batches_and_reshuffles_each_epoch():
    from fastclr.app.dali import dali_loader
    import numpy as np
    data, labels = _np_images(64), np.arange(64)
    a = dali_loader(data, 16, 32, device="cpu", labels=labels, seed=5)
    b = dali_loader(data, 16, 32, device="cpu", labels=labels, seed=5)
    epoch_a, epoch_b = list(a), list(b)
    for (x1, x2, l1), (y1, y2, m1) in zip(epoch_a, epoch_b):
        assert torch.equal(l1, m1) and torch.equal(x1, y1) and torch.equal(x2, y2)
    second = [l for _, _, l in a]
    assert not all(torch.equal(p[2], q) for p, q in zip(epoch_a, second)), "reshuffle per epoch"


@dali
@pytest.mark.parametrize("num_shards", [1, 3])
def test_dali_shards_cover_the_data_once_per_epoch(num_shards):
    from fastclr.app.dali import dali_loader
    import numpy as np
    n = 50
    for epoch in range(2):
        seen = []
        for shard in range(num_shards):
            loader = dali_loader(_np_images(n), 8, 16, device="cpu", labels=np.arange(n), seed=3,
                                 shard_id=shard, num_shards=num_shards, drop_last=False)
            for _ in range(epoch):  # advance to this epoch
                list(loader)
            seen += [int(v) for _, _, lab in loader for v in lab]
        assert sorted(seen) == list(range(n))


@dali
def test_dali_image_folder_and_corrupt_file(tmp_path):
    from PIL import Image
    from fastclr.app.dali import dali_loader
    import numpy as np
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / c / f"{i}.png")
    labels = [int(v) for _, _, lab in dali_loader(tmp_path, 4, 32, device="cpu", drop_last=False) for v in lab]
    assert sorted(labels) == [0] * 6 + [1] * 6
    (tmp_path / "b" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(RuntimeError, match="broken.png"):
        for _ in dali_loader(tmp_path, 4, 32, device="cpu", drop_last=False):
            pass
    with pytest.raises(FileNotFoundError, match="no such image folder"):
        dali_loader(tmp_path / "missing", 4, 32, device="cpu")


@dali
def test_dali_bad_arguments():
    from fastclr.app.dali import dali_loader
    with pytest.raises(ValueError, match="device"):
        dali_loader(_np_images(4), 2, 8, device="tpu")
    with pytest.raises(ValueError, match="shard_id"):
        dali_loader(_np_images(4), 2, 8, device="cpu", shard_id=2, num_shards=2)
    with pytest.raises(ValueError, match="uint8"):
        dali_loader(_np_images(4).astype("float32"), 2, 8, device="cpu")


@dali
def test_dali_grayscale_rate_per_sample():
    """About 20% of views come out grey (all three channels equal), sample by sample."""
    from fastclr.app.dali import dali_loader
    n = 1000
    loader = dali_loader(_np_images(n, 16, 16), 250, 16, device="cpu", mean=(0, 0, 0),
                         std=(1 / 255, 1 / 255, 1 / 255))
    grey = total = 0
    for v1, v2, _ in loader:
        for v in (v1, v2):
            # grey up to uint8 rounding in DALI's colour conversions
            same = ((v[:, 0] - v[:, 1]).abs().amax((1, 2)) <= 1.5) & ((v[:, 1] - v[:, 2]).abs().amax((1, 2)) <= 1.5)
            grey += int(same.sum())
            total += v.shape[0]
    assert within(grey / total, 0.2, total)


@dali
def test_dali_flip_rate_per_sample():
    """A grey left-to-right ramp stays monotone under crop, jitter, grayscale and blur: the
    sign of right minus left tells a flipped view; about half are."""
    from fastclr.app.dali import dali_loader
    import numpy as np
    n = 1000
    ramp = np.linspace(0, 255, 32).round().astype(np.uint8)
    data = np.broadcast_to(ramp[None, None, :, None], (n, 32, 32, 3)).copy()
    flipped = total = 0
    for v1, v2, _ in dali_loader(data, 250, 16, device="cpu", mean=(0, 0, 0), std=(1, 1, 1)):
        for v in (v1, v2):
            row = v[:, 0].mean(1)  # (B, W)
            flipped += int((row[:, -1] < row[:, 0]).sum())
            total += v.shape[0]
    assert within(flipped / total, 0.5, total)


@dali
@pytest.mark.cuda
def test_dali_gpu_pipeline_from_array_and_folder(tmp_path):
    from PIL import Image
    from fastclr.app.dali import dali_loader
    import numpy as np
    v1, v2, lab = next(iter(dali_loader(_np_images(64), 32, 32, device="gpu")))
    assert v1.is_cuda and v1.shape == (32, 3, 32, 32) and not torch.equal(v1, v2)
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "a" / f"{i}.jpg")
    v1, _, _ = next(iter(dali_loader(tmp_path, 4, 48, device="gpu")))
    assert v1.is_cuda and v1.shape == (4, 3, 48, 48)


def test_without_crop_the_views_are_the_images_flipped_or_not():
    """crop=False (an image folder's views come cropped from the loader workers): no resampling,
    only the flip, then the rest of the augmentation."""
    x = torch.randint(0, 256, (6, 3, 12, 12), dtype=torch.uint8)
    aug = TorchSimCLRAugment(12, crop=False, colour=False, flip=0.5, mean=(0.0,) * 3, std=(1.0,) * 3)
    v, params = aug(x, generator=torch.Generator().manual_seed(0), views=1, return_params=True)
    want = torch.where(params["flip"][:, None, None, None], x.flip(-1), x).float() / 255
    torch.testing.assert_close(v, want)
    assert 0 < params["flip"].sum() < 6
