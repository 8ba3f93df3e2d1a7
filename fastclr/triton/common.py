"""What the Triton kernels of every op share: whether they are interpreted, how they are
launched, 64-bit row offsets, tile sizes and the tensor-core precision of ``tl.dot``."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

NORM_EPS = 1e-12

# triton decides at @triton.jit time whether a kernel is interpreted (CPU tensors) or
# compiled for a GPU, so this is fixed when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def launcher(kernel):
    """wrap_triton(kernel): the launch torch.compile and opcheck can trace. Interpreted kernels
    that this torch's wrap_triton rejects (torch 2.11 takes only JITFunction / Autotuner, and
    triton 3.6's interpreter makes neither) are launched directly."""
    if INTERPRETED and not isinstance(kernel, (JITFunction, Autotuner)):
        return kernel
    return wrap_triton(kernel)


@triton.jit
def row_offset(rows, stride):
    """rows * stride in 64 bits: M x D (or M x K) elements can pass 2^31 (M = 2^21 at D = 1024),
    where int32 offsets would wrap and address out of bounds."""
    return rows.to(tl.int64) * stride


def pow2_at_least(x: int, lo: int = 16) -> int:
    """The tile side for ``x``: a power of two, at least ``lo`` (tl.dot's minimum is 16)."""
    return max(lo, triton.next_power_of_2(x))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 inputs as three TF32 products (~fp32 accuracy on tensor
    cores), half inputs exactly."""
    return "tf32x3" if dtype == torch.float32 else "ieee"
