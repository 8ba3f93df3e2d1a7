"""SimCLR model: a torchvision ResNet backbone and the projection head.

``SimCLRModel(backbone)(x) -> (features, z)``: ``features`` are the backbone's pooled features
(what evaluation uses), ``z`` the projection head's output (what the loss sees).
"""
from __future__ import annotations

import torch
from torch import nn

# name -> (torchvision block class, blocks per stage). torchvision.models is imported when a
# backbone is built (it takes seconds; `python -m fastclr.train --help` need not wait for it).
BACKBONES = {
    "resnet18": ("BasicBlock", (2, 2, 2, 2)),
    "resnet34": ("BasicBlock", (3, 4, 6, 3)),
    "resnet50": ("Bottleneck", (3, 4, 6, 3)),
}


def resnet_backbone(name: str = "resnet18", *, width: int = 64, cifar_stem: bool = False) -> nn.Module:
    """A torchvision ResNet without its classifier (``fc`` is ``Identity``), so it returns the
    pooled features, ``out_features`` wide.

    ``width``: channels of the first stage (64 is the standard network; the stages are width,
    2w, 4w, 8w); smaller widths make tiny CPU runs fast. ``cifar_stem``: a 3x3 stride-1 first
    convolution and no max-pool, for small images (32 px and below), as in the SimCLR paper's
    CIFAR experiments.
    """
    if name not in BACKBONES:
        raise ValueError(f"resnet_backbone: name must be one of {sorted(BACKBONES)}, got {name!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"resnet_backbone: width must be a positive int, got {width!r}")
    from torchvision.models import resnet as tv_resnet
    block_name, layers = BACKBONES[name]
    block = getattr(tv_resnet, block_name)
    net = tv_resnet.ResNet(block, list(layers))
    if width != 64 or cifar_stem:
        # torchvision fixes the stage widths at 64..512; rebuild the stages at `width` with its
        # own _make_layer (same blocks, same initialisation below as ResNet.__init__).
        net.inplanes = width
        net.conv1 = (nn.Conv2d(3, width, 3, 1, 1, bias=False) if cifar_stem
                     else nn.Conv2d(3, width, 7, 2, 3, bias=False))
        net.bn1 = nn.BatchNorm2d(width)
        if cifar_stem:
            net.maxpool = nn.Identity()
        net.layer1 = net._make_layer(block, width, layers[0])
        net.layer2 = net._make_layer(block, 2 * width, layers[1], stride=2)
        net.layer3 = net._make_layer(block, 4 * width, layers[2], stride=2)
        net.layer4 = net._make_layer(block, 8 * width, layers[3], stride=2)
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    net.out_features = 8 * width * block.expansion
    net.fc = nn.Identity()
    return net


def projection_head(in_features: int, *, hidden: int | None = None, out: int = 128,
                    layers: int = 2) -> nn.Sequential:
    """SimCLR's projection head g: ``layers`` linear layers with BN and ReLU between them
    (2 as SimCLR v1, 3 as v2), BN without affine on the output as in SimCLR v2's code."""
    if layers not in (2, 3):
        raise ValueError(f"projection_head: layers must be 2 or 3, got {layers!r}")
    hidden = hidden or in_features
    mods = []
    dim = in_features
    for _ in range(layers - 1):
        mods += [nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        dim = hidden
    mods += [nn.Linear(dim, out, bias=False), nn.BatchNorm1d(out, affine=False)]
    return nn.Sequential(*mods)


class SimCLRModel(nn.Module):
    """Backbone f and projection head g: ``forward(x) -> (f(x), g(f(x)))``."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor):
        h = self.backbone(x)
        return h, self.head(h)


def build_model(backbone: str = "resnet18", *, width: int = 64, cifar_stem: bool = False,
                head_layers: int = 2, proj_dim: int = 128, hidden: int | None = None) -> SimCLRModel:
    f = resnet_backbone(backbone, width=width, cifar_stem=cifar_stem)
    return SimCLRModel(f, projection_head(f.out_features, hidden=hidden, out=proj_dim, layers=head_layers))
