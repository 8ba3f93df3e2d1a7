"""SimCLR augmentation: two independent views per image, every random parameter per sample.

Each view (SimCLR, Chen et al. 2020, appendix A): random resized crop (scale 0.08-1, ratio
3/4-4/3) to ``size``; horizontal flip (p = 0.5); colour jitter (p = 0.8; brightness, contrast,
saturation 0.8 s, hue 0.2 s, in random order); grayscale (p = 0.2); Gaussian blur (p = 0.5,
sigma in [0.1, 2], kernel ~10% of the side; on by default for size >= 96); optional solarize;
normalise with mean/std.

``TorchSimCLRAugment`` does this as batched tensor ops on CPU or CUDA tensors:
- crop, resize and flip are one per-sample affine resampling (``F.grid_sample``, bilinear);
- the colour jitter is one per-sample affine colour transform composed in a per-sample random
  order (brightness, contrast around the image's mean grey, saturation, hue as a rotation in
  YIQ), clamped to [0, 1] once at the end, as DALI's ``color_twist`` does; torchvision instead
  clamps after each of the four factors;
- the blur is a per-sample separable Gaussian as a grouped convolution (identity kernel where
  not applied).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Per-channel normalisation of the datasets (fastclr.app.data and fastclr.app.dali take them from here).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
# RGB -> YIQ and back: hue is a rotation of the (I, Q) plane.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) or (B, 3, H, W) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"augment: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"augment: images must be uint8, got {images.dtype}")
    if images.dim() != 4 or 3 not in (images.shape[1], images.shape[3]):
        raise ValueError("augment: images must be (B, H, W, 3) or (B, 3, H, W), got shape "
                         f"{tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("augment: empty batch")
    if images.shape[1] != 3:  # channels last
        images = images.permute(0, 3, 1, 2)
    return images.float().div_(255)


class TorchSimCLRAugment:
    """SimCLR's two-view augmentation as batched tensor ops (CPU or CUDA).

    Args:
        size: output side (square).
        strength: colour-jitter strength s (1 for ImageNet-like data, 0.5 for CIFAR-like).
        blur: Gaussian blur on/off; default on for size >= 96 (as the paper).
        solarize: probability of solarizing a view (0 = off).
        mean, std: normalisation (default ImageNet's).
        dtype: output dtype (float32 or bfloat16).
        channels_last: return channels_last tensors.
        scale, ratio: the random resized crop's area fraction and aspect-ratio ranges.
        flip: probability of a horizontal flip (0.5; 0 for data where mirror images differ).
        colour: False: no colour jitter and no grayscale (crop and flip only, as fine-tuning uses).
        crop: False: the images come already cropped (an image folder's views are cropped from the
            originals in the loader workers): flip only, each resized to ``size`` if it is not.

    ``aug(images_uint8, generator=None, views=2) -> (view_1, ..., view_views)``, every view's
    parameters drawn independently; ``return_params=True`` also returns the parameters drawn
    (per sample and view), for tests.
    """

    def __init__(self, size: int, *, strength: float = 0.5, blur: bool | None = None,
                 solarize: float = 0.0, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: float = 0.5, colour: bool = True,
                 crop: bool = True):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"TorchSimCLRAugment: size must be a positive int, got {size!r}")
        if not 0 <= strength <= 4:
            raise ValueError(f"TorchSimCLRAugment: strength must be in [0, 4], got {strength!r}")
        if not 0 <= solarize <= 1:
            raise ValueError(f"TorchSimCLRAugment: solarize must be a probability, got {solarize!r}")
        if not 0 <= flip <= 1:
            raise ValueError(f"TorchSimCLRAugment: flip must be a probability, got {flip!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"TorchSimCLRAugment: scale must be 0 < lo <= hi <= 1, got {scale!r}")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"TorchSimCLRAugment: dtype must be float32, bfloat16 or float16, got {dtype}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError("TorchSimCLRAugment: mean and std need 3 values, std > 0")
        self.size = size
        self.strength = float(strength)
        self.blur = size >= 96 if blur is None else bool(blur)
        self.solarize = float(solarize)
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))
        self.dtype = dtype
        self.channels_last = channels_last
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.flip = float(flip)
        self.colour = bool(colour)
        self.crop = bool(crop)
        self._consts = {}  # constant tensors per device, made once: no host-to-device copy per call
        # kernel ~10% of the side, odd (the paper: 23 px at 224)
        self.blur_kernel = max(3, int(round(0.1 * size)) // 2 * 2 + 1)

    def __repr__(self) -> str:
        return (f"TorchSimCLRAugment(size={self.size}, strength={self.strength}, blur={self.blur}, "
                f"solarize={self.solarize}, dtype={self.dtype})")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 return_params: bool = False, views: int = 2):
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"TorchSimCLRAugment: views must be an int >= 1, got {views!r}")
        x = _check_images(images)
        x = torch.cat([x] * views)  # all views at once: views x B samples, independent parameters
        params = {}
        x = self._crop_flip(x, generator, params)
        if self.colour:
            x = self._colour(x, generator, params)
        if self.blur:
            x = self._gaussian_blur(x, generator, params)
        if self.solarize > 0:
            sol = self._rand(x, generator) < self.solarize
            x = torch.where(sol[:, None, None, None] & (x >= 0.5), 1 - x, x)
            params["solarize"] = sol
        mean = self._const("mean", self.mean, x.device)[None, :, None, None]
        std = self._const("std", self.std, x.device)[None, :, None, None]
        x = ((x - mean) / std).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = x.chunk(views)
        return (*out, params) if return_params else out

    def _const(self, name: str, value, device) -> torch.Tensor:
        """``value`` (a list, or a function making a CPU tensor) as a float32 tensor on ``device``,
        made on first use only."""
        key = (name, device)
        if key not in self._consts:
            v = value() if callable(value) else torch.tensor(value)
            self._consts[key] = v.to(device=device, dtype=torch.float32)
        return self._consts[key]

    @staticmethod
    def _rand(x: torch.Tensor, generator, *shape) -> torch.Tensor:
        return torch.rand((x.shape[0], *shape), generator=generator, device=x.device)

    def _crop_flip(self, x, generator, params):
        """Random resized crop (torchvision's sampling: 10 tries, then the central crop of the
        closest allowed ratio) and flip, as one affine resampling per sample."""
        n, _, h, w = x.shape
        if not self.crop:
            return self._flip_only(x, generator, params)
        area = h * w
        tries = 10
        u = self._rand(x, generator, tries, 2)
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[..., 1]
        r = torch.exp(log_r)
        cw = torch.sqrt(target * r).round()
        ch = torch.sqrt(target / r).round()
        ok = (cw >= 1) & (ch >= 1) & (cw <= w) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full_like(ok[:, 0], -1, dtype=torch.long))
        idx = first.clamp_min(0)
        cw = cw.gather(1, idx[:, None])[:, 0]
        ch = ch.gather(1, idx[:, None])[:, 0]
        # fallback: the whole image, cropped to the nearest allowed ratio
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = w, round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(h * self.ratio[1]), h
        else:
            fw, fh = w, h
        found = first >= 0
        cw = torch.where(found, cw, torch.full_like(cw, fw))
        ch = torch.where(found, ch, torch.full_like(ch, fh))
        pos = self._rand(x, generator, 2)
        x0 = torch.where(found, (pos[:, 0] * (w - cw + 1)).floor(), torch.full_like(cw, (w - fw) // 2))
        y0 = torch.where(found, (pos[:, 1] * (h - ch + 1)).floor(), torch.full_like(ch, (h - fh) // 2))
        flip = self._rand(x, generator) < self.flip
        # output pixel centre (normalised, align_corners=False) -> input position
        sx = cw / w * torch.where(flip, -1.0, 1.0)
        sy = ch / h
        cx = (2 * x0 + cw) / w - 1
        cy = (2 * y0 + ch) / h - 1
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
        grid = F.affine_grid(theta, (n, 3, self.size, self.size), align_corners=False)
        params.update(crop_w=cw, crop_h=ch, crop_x=x0, crop_y=y0, flip=flip, crop_fallback=~found)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _flip_only(self, x, generator, params):
        """Flip (and resize to ``size`` where needed) images cropped before they came."""
        flip = self._rand(x, generator) < self.flip
        params.update(flip=flip)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    def _colour(self, x, generator, params):
        """Colour jitter (p = 0.8, factors in a per-sample random order) as one affine colour
        transform per sample, then grayscale (p = 0.2)."""
        n = x.shape[0]
        dev = x.device
        s = self.strength
        f = self._rand(x, generator, 4)
        bright = 1 + 0.8 * s * (2 * f[:, 0] - 1)
        contrast = 1 + 0.8 * s * (2 * f[:, 1] - 1)
        sat = 1 + 0.8 * s * (2 * f[:, 2] - 1)
        hue = 0.2 * s * (2 * f[:, 3] - 1)  # fraction of a full turn
        jitter = self._rand(x, generator) < 0.8
        order = torch.argsort(self._rand(x, generator, 4), dim=1)
        eye = torch.eye(3, device=dev).expand(n, 3, 3)
        grey = self._const("grey", _GREY, dev)
        ones_grey = torch.ones(3, 1, device=dev) @ grey[None, :]  # rows: the grey weights
        yiq = self._const("yiq", _YIQ, dev)
        iyiq = self._const("iyiq", lambda: torch.linalg.inv(torch.tensor(_YIQ)), dev)
        cos, sin = torch.cos(2 * math.pi * hue), torch.sin(2 * math.pi * hue)
        rot = torch.zeros(n, 3, 3, device=dev)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
        hue_m = iyiq @ rot @ yiq
        sat_m = sat[:, None, None] * eye + (1 - sat)[:, None, None] * ones_grey
        mean_rgb = x.mean(dim=(2, 3))  # per-image mean colour, for the contrast's grey level
        A = eye.clone()
        off = torch.zeros(n, 3, device=dev)
        for slot in range(4):
            op = order[:, slot]
            # brightness: scale
            mb = (op == 0)[:, None, None]
            A_b, off_b = bright[:, None, None] * A, bright[:, None] * off
            # contrast: blend with the mean grey of the image as it is at this point
            mu = ((A @ mean_rgb[:, :, None])[:, :, 0] + off) @ grey
            A_c = contrast[:, None, None] * A
            off_c = contrast[:, None] * off + ((1 - contrast) * mu)[:, None]
            # saturation and hue: linear maps
            A_s, off_s = sat_m @ A, (sat_m @ off[:, :, None])[:, :, 0]
            A_h, off_h = hue_m @ A, (hue_m @ off[:, :, None])[:, :, 0]
            A = torch.where(mb, A_b, torch.where((op == 1)[:, None, None], A_c,
                            torch.where((op == 2)[:, None, None], A_s, A_h)))
            off = torch.where(mb[:, :, 0], off_b, torch.where((op == 1)[:, None], off_c,
                              torch.where((op == 2)[:, None], off_s, off_h)))
        A = torch.where(jitter[:, None, None], A, eye)
        off = torch.where(jitter[:, None], off, torch.zeros_like(off))
        x = (torch.einsum("nij,njhw->nihw", A, x) + off[:, :, None, None]).clamp_(0, 1)
        gray = self._rand(x, generator) < 0.2
        g = torch.einsum("c,nchw->nhw", grey, x)[:, None].expand_as(x)
        x = torch.where(gray[:, None, None, None], g, x)
        params.update(jitter=jitter, brightness=bright, contrast=contrast, saturation=sat, hue=hue,
                      jitter_order=order, grayscale=gray)
        return x

    def _gaussian_blur(self, x, generator, params):
        """p = 0.5, sigma ~ U[0.1, 2] (in pixels of the output, as torchvision), separable."""
        n, c, h, w = x.shape
        k = self.blur_kernel
        apply = self._rand(x, generator) < 0.5
        sigma = 0.1 + 1.9 * self._rand(x, generator)
        t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
        kern = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        kern = kern / kern.sum(1, keepdim=True)
        delta = (t == 0).to(x.dtype).expand(n, k)
        kern = torch.where(apply[:, None], kern, delta)
        weight = kern.repeat_interleave(c, dim=0)  # (n*c, k): each sample's kernel for its channels
        y = x.reshape(1, n * c, h, w)
        pad = k // 2
        y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), weight[:, None, None, :], groups=n * c)
        y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), weight[:, None, :, None], groups=n * c)
        params.update(blur=apply, blur_sigma=sigma)
        return y.reshape(n, c, h, w)
