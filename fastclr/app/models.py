"""SimCLR model: a torchvision classification network as the backbone, and the projection head.

``SimCLRModel(backbone, head)(x) -> (features, z)``: ``features`` are the backbone's pooled
features (what evaluation uses and what ``python -m fastclr.export`` writes), ``z`` the head's
output (the projection the contrastive loss sees; for ``--loss supervised``, a linear classifier's
logits).

Any torchvision classification model serves as the backbone (``backbone(name)``): its last linear
layer -- the classifier -- becomes ``Identity``, so it returns the features that layer took, and
the model's own parameter names stay as torchvision spells them, so an exported backbone loads
strictly into ``torchvision.models.get_model(name)`` with that layer replaced the same way. The
ResNet-18/34/50/101/152 also take ``width`` (channels of the first stage), which makes tiny CPU
runs fast.
"""
from __future__ import annotations

import difflib

import torch
from torch import nn

# name -> (torchvision block class, blocks per stage): the ResNets whose width can change.
# torchvision.models is imported when a backbone is built (it takes seconds; `--help` need not wait).
RESNETS = {
    "resnet18": ("BasicBlock", (2, 2, 2, 2)),
    "resnet34": ("BasicBlock", (3, 4, 6, 3)),
    "resnet50": ("Bottleneck", (3, 4, 6, 3)),
    "resnet101": ("Bottleneck", (3, 4, 23, 3)),
    "resnet152": ("Bottleneck", (3, 8, 36, 3)),
}
# builders' arguments for the models whose defaults do not return plain features
_BUILD_KWARGS = {"googlenet": dict(aux_logits=False, init_weights=True),
                 "inception_v3": dict(aux_logits=False, init_weights=True)}


def backbone_names() -> list:
    """Every name ``--backbone`` takes: torchvision's classification models."""
    from torchvision import models as tv_models
    return tv_models.list_models(module=tv_models)


def check_backbone_name(name: str) -> str:
    names = backbone_names()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=3)
        raise ValueError(f"--backbone {name!r} is not a torchvision classification model"
                         + (f" (did you mean {', '.join(near)}?)" if near else "")
                         + "; torchvision.models.list_models(module=torchvision.models) lists them")
    return name


def _torchvision_model(name: str, image_size: int | None) -> nn.Module:
    from torchvision import models as tv_models
    kwargs = dict(_BUILD_KWARGS.get(name, {}))
    if name.startswith("vit_") and image_size is not None:
        kwargs["image_size"] = image_size  # the position embedding's grid
    check_backbone_name(name)
    try:
        return tv_models.get_model(name, weights=None, **kwargs)
    except (AssertionError, ValueError) as exc:  # e.g. a ViT's view side not a multiple of its patch
        raise ValueError(f"--backbone {name} cannot take {image_size} px views: {exc}") from None


def _last_linear(net: nn.Module):
    """(parent module, attribute name, layer) of the model's last nn.Linear: its classifier."""
    found = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = name
    if found is None:
        return None
    parent_name, _, attr = found.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    return parent, attr, getattr(parent, attr)


def _cifar_stem(net: nn.Module, apply: bool) -> bool:
    """Whether the small-image stem means something for ``net``; with ``apply``, make it. ResNets
    (``conv1`` and ``maxpool``): a 3x3 stride-1 ``conv1`` and no max-pool, as the SimCLR paper's
    CIFAR networks. Other networks whose first layer is a 3x3 stride-2 convolution (MobileNets,
    EfficientNets, RegNets, ShuffleNets, ...): that stride becomes 1, and a stem max-pool goes.
    Patchifying stems (ViT, Swin, ConvNeXt) and large-kernel ones have no such form."""
    conv1 = getattr(net, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
        if apply:
            net.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, 1, 1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        return True
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None or first.kernel_size != (3, 3) or first.stride != (2, 2):
        return False
    if apply:
        first.stride = (1, 1)
        if isinstance(getattr(net, "maxpool", None), nn.MaxPool2d):
            net.maxpool = nn.Identity()
    return True


def cifar_stem_applies(name: str) -> bool:
    """Whether ``--cifar-stem`` means something for the backbone ``name`` (built on the meta
    device: no memory, no initialisation cost)."""
    if name in RESNETS:
        return True
    with torch.device("meta"):
        return _cifar_stem(_torchvision_model(name, None), apply=False)


def _resnet(name: str, width: int, cifar_stem: bool) -> nn.Module:
    """A torchvision ResNet with ``width`` channels in its first stage (stages width..8 width),
    its ``fc`` already ``Identity``."""
    from torchvision.models import resnet as tv_resnet
    block_name, layers = RESNETS[name]
    block = getattr(tv_resnet, block_name)
    net = tv_resnet.ResNet(block, list(layers))
    if width != 64 or cifar_stem:
        # torchvision fixes the stage widths at 64..512; rebuild the stages at `width` with its
        # own _make_layer (same blocks, same initialisation as ResNet.__init__).
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


def _without_classifier(net: nn.Module, name: str) -> nn.Module:
    """``net`` with its last linear layer replaced by ``Identity``; ``out_features`` set."""
    classifier = _last_linear(net)
    if classifier is None:
        raise ValueError(f"--backbone {name} has no linear classifier to replace (its head is "
                         "convolutional), so its features are not a vector; pick another model")
    parent, attr, layer = classifier
    setattr(parent, attr, nn.Identity())
    net.out_features = layer.in_features
    return net


def backbone(name: str = "resnet18", *, width: int | None = None, cifar_stem: bool = False,
             image_size: int | None = None) -> nn.Module:
    """The torchvision model ``name`` without its classifier (its last linear layer is
    ``Identity``), returning features ``out_features`` wide.

    ``width``: the ResNets' first-stage channels (None or 64: the standard network; other models
    refuse it). ``cifar_stem``: the small-image stem (``_cifar_stem``; refused where it means
    nothing). ``image_size``: the views' side; when given, one forward checks the model takes it.
    """
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"backbone: width must be a positive int, got {width!r}")
    if width not in (None, 64) and name not in RESNETS:
        raise ValueError(f"--width applies to the ResNets ({', '.join(RESNETS)}), not to {name}")
    if name in RESNETS:
        net = _resnet(name, width or 64, cifar_stem)
    else:
        net = _without_classifier(_torchvision_model(name, image_size), name)
    if cifar_stem and name not in RESNETS and not _cifar_stem(net, apply=True):
        raise ValueError(f"--cifar-stem on: {name} has no 3x3 stride-2 (or ResNet) stem to make "
                         "stride 1; use --cifar-stem off")
    if image_size is not None:
        _check_takes(net, name, image_size)
    return net


@torch.no_grad()
def _check_takes(net: nn.Module, name: str, image_size: int) -> None:
    """One forward of two views: the model must return (2, out_features) features."""
    was_training = net.training
    net.eval()
    try:
        out = net(torch.zeros(2, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ValueError(f"--backbone {name} cannot take {image_size} px views: "
                         f"{str(exc).splitlines()[0]}") from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or out.shape != (2, net.out_features):
        raise ValueError(f"--backbone {name}: its forward does not return ({net.out_features},) "
                         f"features per image at {image_size} px")


def resnet_backbone(name: str = "resnet18", *, width: int = 64, cifar_stem: bool = False) -> nn.Module:
    """A ResNet backbone (``backbone`` restricted to the ResNets, as before)."""
    if name not in RESNETS:
        raise ValueError(f"resnet_backbone: name must be one of {sorted(RESNETS)}, got {name!r}")
    return backbone(name, width=width, cifar_stem=cifar_stem)


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
    """Backbone f and head g: ``forward(x) -> (f(x), g(f(x)))``."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor):
        h = self.backbone(x)
        return h, self.head(h)


def build_model(name: str = "resnet18", *, width: int | None = None, cifar_stem: bool = False,
                head_layers: int = 2, proj_dim: int = 128, hidden: int | None = None,
                image_size: int | None = None, num_classes: int | None = None) -> SimCLRModel:
    """The backbone and, as the head, SimCLR's projection head -- or, with ``num_classes`` (the
    supervised baseline), one linear classifier."""
    f = backbone(name, width=width, cifar_stem=cifar_stem, image_size=image_size)
    head = (nn.Linear(f.out_features, num_classes) if num_classes is not None else
            projection_head(f.out_features, hidden=hidden, out=proj_dim, layers=head_layers))
    return SimCLRModel(f, head)
