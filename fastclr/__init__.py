"""fastclr: fast SimCLR at large batch sizes.

Importing fastclr needs neither a GPU nor the compiled extension (see ``fastclr.ops``).
"""
from fastclr import reference
from fastclr.augment import TorchSimCLRAugment
from fastclr.grad_cache import grad_cache_backward
from fastclr.loss import NTXentLoss, SupConLoss, nt_xent_fused, supcon_fused
from fastclr.ops import extension_available, extension_error
from fastclr.optim import LARS, lars_param_groups
from fastclr.similarity import knn_topk, normalized_similarity

__version__ = "0.1.0"
__all__ = ["nt_xent_fused", "grad_cache_backward", "NTXentLoss", "supcon_fused", "SupConLoss", "LARS", "lars_param_groups", "TorchSimCLRAugment", "reference",
           "normalized_similarity", "knn_topk", "extension_available", "extension_error", "__version__"]
