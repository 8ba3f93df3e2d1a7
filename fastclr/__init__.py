"""fastclr: fast SimCLR at large batch sizes.

The library (this package's top level: the loss family, normalized similarity and kNN, LARS,
the gather, gradient caching, the reference, the op loading and dispatch) needs torch alone;
importing it needs neither a GPU nor the compiled extension (see ``fastclr.ops``). The training
application (``fastclr.app``: ``python -m fastclr.train``, data, augmentation, models,
evaluation) needs the ``train`` extra: ``pip install "fastclr[train]"``.
"""
from fastclr import reference
from fastclr.grad_cache import grad_cache_backward
from fastclr.loss import NTXentLoss, SupConLoss, nt_xent_fused, supcon_fused
from fastclr.ops import extension_available, extension_error
from fastclr.optim import LARS, lars_param_groups
from fastclr.similarity import knn_topk, normalized_similarity

__version__ = "0.1.0"
__all__ = ["nt_xent_fused", "grad_cache_backward", "NTXentLoss", "supcon_fused", "SupConLoss", "LARS", "lars_param_groups", "TorchSimCLRAugment", "load_backbone", "reference",
           "normalized_similarity", "knn_topk", "extension_available", "extension_error", "__version__"]


def __getattr__(name):
    # TorchSimCLRAugment and load_backbone belong to the application (fastclr.app: they need
    # torchvision); imported on first use
    if name == "TorchSimCLRAugment":
        from fastclr.app.augment import TorchSimCLRAugment
        return TorchSimCLRAugment
    if name == "load_backbone":
        from fastclr.app.export import load_backbone
        return load_backbone
    raise AttributeError(f"module 'fastclr' has no attribute {name!r}")
