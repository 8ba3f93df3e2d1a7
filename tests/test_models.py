"""The model builder (fastclr/app/models.py); any torchvision backbone: tests/test_train_loop.py
and tests/test_evaluate.py (export)."""
import pytest
import torch

from fastclr.app import models


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
