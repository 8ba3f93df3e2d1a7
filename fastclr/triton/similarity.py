"""Triton normalized similarity: s_ij = (a_i . b_j) / (max(||a_i||, eps) max(||b_j||, eps)).

``_normalized_similarity_kernel``: one (BLOCK_M x BLOCK_N) output tile per program; the product
runs on tensor cores (tl.dot) from the raw input-dtype rows, fp32 accumulation, and the two
inverse norms scale the fp32 tile in the epilogue -- no normalised copy of a or b is made.
Memory: the output, plus M + K floats of inverse norms.

``fastclr::normalized_similarity_triton`` is a ``torch.library.triton_op``; its gradient is the
composite ``fastclr::normalized_similarity_backward`` (two matrix products), shared with the CPU
kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from fastclr._autograd import similarity_backward, similarity_setup_context
from fastclr.triton.common import (INTERPRETED, NORM_EPS, dot_precision, launcher, pow2_at_least,
                                   row_offset)


@triton.jit
def _normalized_similarity_kernel(a_ptr, b_ptr, ra_ptr, rb_ptr, out_ptr, M, K, D, stride_a,
                                  stride_b, stride_o, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        a = tl.load(a_ptr + row_offset(rows, stride_a)[:, None] + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(b_ptr + row_offset(cols, stride_b)[:, None] + offs_d[None, :],
                    mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    ra = tl.load(ra_ptr + rows, mask=rmask, other=0.0)
    rb = tl.load(rb_ptr + cols, mask=cmask, other=0.0)
    out = acc * ra[:, None] * rb[None, :]
    tl.store(out_ptr + row_offset(rows, stride_o)[:, None] + cols[None, :], out,
             mask=rmask[:, None] & cmask[None, :])


def _inv_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal()


@triton_op("fastclr::normalized_similarity_triton", mutates_args=())
def normalized_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) float32 cosine similarities of the rows of a (M, D) and b (K, D)."""
    a, b = a.contiguous(), b.contiguous()
    m, d = a.shape
    k = b.shape[0]
    out = torch.empty(m, k, device=a.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    ra, rb = _inv_norms(a), _inv_norms(b)
    bm = bn = 32 if INTERPRETED else 64
    bd = min(32 if a.dtype == torch.float32 else 64, pow2_at_least(d))
    launcher(_normalized_similarity_kernel)[(triton.cdiv(m, bm), triton.cdiv(k, bn))](
        a, b, ra, rb, out, m, k, d, a.stride(0), b.stride(0), out.stride(0), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_D=bd, PRECISION=dot_precision(a.dtype), num_warps=4, num_stages=3)
    return out


normalized_similarity.register_autograd(similarity_backward, setup_context=similarity_setup_context)
