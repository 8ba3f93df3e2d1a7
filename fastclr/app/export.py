"""``python -m fastclr.export RUN_DIR_OR_CHECKPOINT --out backbone.pt``: the trained backbone
alone, for use outside fastclr, and ``fastclr.app.export.load_backbone(path)`` to read it back.

The weights keep torchvision's parameter names, so they load with ``strict=True`` into the
torchvision model of the run's ``--backbone`` once its classifier (the last linear layer) is
``nn.Identity()`` -- and, for a run with the CIFAR stem, after the same stem change fastclr made
(docs/training.md, "Taking the backbone away"). A ResNet trained at a ``--width`` other than 64 has
the same names at other shapes: ``load_backbone`` builds it. Two formats:

- ``.pt`` (default): ``torch.save`` of ``{"format", "architecture", "state_dict"}``;
- ``--format safetensors``: the state dict as a safetensors file, ``format`` and
  ``architecture`` (JSON) in its metadata.

``architecture`` says how to rebuild and feed the network: the backbone's name, width, stem, the
view size it was trained at, its feature width and the normalisation (mean, std) of its inputs.
"""
from __future__ import annotations

import argparse
import io
import json
import os

import torch
from torch import nn

from . import data
from .checkpoint import atomic_write, load_run, model_of
from .config import RunConfig
from .models import backbone

EXPORT_FORMAT = "fastclr-backbone-1"
FORMATS = ("pt", "safetensors")


def architecture(config: RunConfig, model, mean, std) -> dict:
    return {"backbone": config.backbone, "width": config.width,
            "cifar_stem": config.cifar_stem == "on", "image_size": config.image_size,
            "out_features": int(model.backbone.out_features), "mean": list(mean), "std": list(std),
            "trained_with": config.loss, "dataset": config.dataset}


def export_bytes(state_dict: dict, arch: dict, fmt: str) -> bytes:
    """The file's bytes: ``fmt`` "pt" or "safetensors"."""
    state_dict = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if fmt == "safetensors":
        from safetensors.torch import save
        return save(state_dict, metadata={"format": EXPORT_FORMAT, "architecture": json.dumps(arch)})
    buf = io.BytesIO()
    torch.save({"format": EXPORT_FORMAT, "architecture": arch, "state_dict": state_dict}, buf)
    return buf.getvalue()


def read_export(path: str) -> tuple:
    """(architecture, state dict) of an exported backbone; anything else refused by name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_backbone: no file at {path}")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK":
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - a zip torch cannot read: truncated, or not torch's
            raise ValueError(f"load_backbone: cannot read {path} (truncated, or a zip file torch.save "
                             f"did not write: {type(exc).__name__})") from None
        if not isinstance(blob, dict) or blob.get("format") != EXPORT_FORMAT:
            hint = (" (a training checkpoint: export its backbone with python -m fastclr.export)"
                    if isinstance(blob, dict) and str(blob.get("format", "")).startswith("fastclr-checkpoint")
                    else "")
            raise ValueError(f"load_backbone: {path} is not a fastclr backbone export{hint}")
        return blob["architecture"], blob["state_dict"]
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"load_backbone: {path} is neither a .pt nor a safetensors backbone export "
                         f"({exc})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"load_backbone: {path} is a safetensors file but not a fastclr backbone export")
    return json.loads(meta["architecture"]), state


def load_backbone(path: str, map_location="cpu") -> nn.Module:
    """The exported backbone as a module in eval mode (weights loaded strictly): ``net(x)`` gives
    ``(N, net.out_features)`` features of images normalised with ``net.architecture["mean"]`` /
    ``["std"]`` at ``["image_size"]`` px."""
    arch, state = read_export(path)
    net = backbone(arch["backbone"], width=arch["width"], cifar_stem=arch["cifar_stem"],
                   image_size=arch["image_size"])
    net.load_state_dict(state, strict=True)
    net.architecture = arch
    return net.to(map_location).eval()


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m fastclr.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", help="a training run's folder or its checkpoint.pt")
    p.add_argument("--out", required=True, help="the file to write (e.g. backbone.pt)")
    p.add_argument("--format", choices=FORMATS, help="pt or safetensors (default: from --out's "
                   "suffix, else pt)")
    args = p.parse_args(argv)
    fmt = args.format or ("safetensors" if args.out.endswith(".safetensors") else "pt")
    ckpt, config, ckpt_path = load_run(args.run, "fastclr.export")
    model = model_of(ckpt, config, random_init=False, num_classes=1, program="fastclr.export")
    mean, std = data.normalisation(config.dataset)
    blob = export_bytes(model.backbone.state_dict(), architecture(config, model, mean, std), fmt)
    try:
        atomic_write(args.out, blob)
    except OSError as exc:
        raise SystemExit(f"fastclr.export: cannot write {args.out}: {exc.strerror or exc}") from None
    print(f"wrote {args.out} ({fmt}, {len(blob) / 2**20:.1f} MiB): the {config.backbone} backbone of "
          f"{ckpt_path} (epoch {ckpt['run']['epoch']}), {model.backbone.out_features} features")
    return args.out
