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

__version__ = "0.2.0"
__all__ = ["nt_xent_fused", "grad_cache_backward", "NTXentLoss", "supcon_fused", "SupConLoss",
           "LARS", "lars_param_groups", "reference", "normalized_similarity", "knn_topk",
           "extension_available", "extension_error", "__version__"]

# Names 0.1.0 exported from here that belong to the application (they need torchvision). Until
# 0.3.0, ``fastclr.<name>`` still finds them, with a DeprecationWarning naming the new import;
# this is the one place the library looks up into the application (tests/test_layers.py).
_MOVED = {"TorchSimCLRAugment": "fastclr.app.augment", "load_backbone": "fastclr.app.export"}


def __getattr__(name):
    if name in _MOVED:
        import importlib
        import warnings
        module = _MOVED[name]
        warnings.warn(f"fastclr.{name} moved to the application: from {module} import {name} "
                      "(the old name goes in fastclr 0.3.0)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'fastclr' has no attribute {name!r}")
