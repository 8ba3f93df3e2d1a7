"""The torch SimCLR augmentation: shapes, per-sample randomness, parameter statistics."""
import math

import pytest
import torch

from fastclr.augment import CIFAR_MEAN, CIFAR_STD, TorchSimCLRAugment

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
