"""Triton NT-Xent: fused normalisation + similarity + online logsumexp, memory-lean backward.

Kernels (formulas of DESIGN.md; z = [z1; z2], M = 2N rows, u = z / max(||z||, 1e-12)):

- ``_nt_xent_norm_kernel``: norm_i = max(||z_i||, 1e-12).                    memory O(M)
- ``_nt_xent_fwd_kernel``: per row block, stream column tiles of s = u u^T / tau with an
  online logsumexp (base 2); the positive logit and the rank (#negatives above the positive)
  come from the same tiles. Saves lse (M floats); never anything M x M.
- ``_nt_xent_bwd_kernel``: per tile pair (I <= J) recompute S_IJ from raw z and the norms,
  A_ij = w_i P_ij + w_j P_ji with P = exp(s - lse) -- one tile serves both P_IJ and P_JI --
  and accumulate G_I += A_IJ u_J, G_J += A_IJ^T u_I (fp32 atomics) and the tile's
  sum A_ij s_ij for the temperature gradient.                                memory O(M D)
- ``_nt_xent_finish_kernel``: grad_u_i = (G_i - (w_i + w_p(i)) u_p(i)) / tau, then the
  normalisation's Jacobian (F.normalize semantics), written in the input dtype.

Both products run on tensor cores (tl.dot) from the raw input-dtype rows; the 1/||z||
scalings are applied to the fp32 tiles, so no normalised copy of z is ever made.

The ops are ``torch.library.triton_op``s (``fastclr::nt_xent_triton_forward`` /
``_backward``), so ``torch.compile`` and ``torch.library.opcheck`` see through them. They run
on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them).
Launch configurations come from ``_config`` (shape heuristics); ``FASTCLR_AUTOTUNE=1``
autotunes instead.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NORM_EPS = 1e-12

AUTOTUNE = os.environ.get("FASTCLR_AUTOTUNE", "0") == "1"

# The same constants as compile-time globals for the kernels.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
NORM_EPS_C = tl.constexpr(NORM_EPS)


# triton decides at @triton.jit time whether a kernel is interpreted (CPU tensors) or
# compiled for a GPU, so this is fixed when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _load_rows(z1_ptr, z2_ptr, rows, row_mask, offs_d, N, D, stride1, stride2):
    """Rows of z = [z1; z2] (rows < N from z1, the rest from z2), columns offs_d, 0 outside."""
    d_mask = offs_d[None, :] < D
    m1 = (row_mask & (rows < N))[:, None] & d_mask
    m2 = (row_mask & (rows >= N))[:, None] & d_mask
    a = tl.load(z1_ptr + rows[:, None] * stride1 + offs_d[None, :], mask=m1, other=0.0)
    b = tl.load(z2_ptr + (rows - N)[:, None] * stride2 + offs_d[None, :], mask=m2, other=0.0)
    return a + b


@triton.jit
def _dot_tile(z1_ptr, z2_ptr, rows_a, mask_a, rows_b, mask_b, N, D, stride1, stride2,
              BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr):
    """Raw dot products z_a . z_b (fp32) of two row sets, looping over D."""
    acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        a = _load_rows(z1_ptr, z2_ptr, rows_a, mask_a, offs_d, N, D, stride1, stride2)
        b = _load_rows(z1_ptr, z2_ptr, rows_b, mask_b, offs_d, N, D, stride1, stride2)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _pow2_scale(x):
    """2^-ceil(log2(max|x|)) (1 for an all-zero tile): brings a tile's largest entry to
    (0.5, 1] without rounding anything."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    return tl.where(amax > 0, tl.exp2(-tl.ceil(tl.log2(tl.maximum(amax, 1e-38)))), 1.0)


@triton.jit
def _nt_xent_norm_kernel(z1_ptr, z2_ptr, norm_ptr, N, D, stride1, stride2,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """norm_i = max(||z_i||, 1e-12), accumulated in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < 2 * N
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        x = _load_rows(z1_ptr, z2_ptr, rows, row_mask, k0 + tl.arange(0, BLOCK_D), N, D,
                       stride1, stride2).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(norm_ptr + rows, tl.maximum(tl.sqrt(sq), 1e-12), mask=row_mask)


@triton.jit
def _fwd_logits(z1_ptr, z2_ptr, norm_ptr, rows, row_mask, scale_i, p0, t, N, D, stride1,
                stride2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """Column tile t of the rotated column order (columns p0 + t*BLOCK_N + ..., mod M) as
    base-2 logits s_ij * log2(e), with the self column and padding at -inf."""
    M = 2 * N
    lin = t * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (p0 + lin) % M
    col_mask = lin < M
    acc = _dot_tile(z1_ptr, z2_ptr, rows, row_mask, cols, col_mask, N, D, stride1, stride2,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    rn_j = 1.0 / tl.load(norm_ptr + cols, mask=col_mask, other=1.0)
    x = acc * scale_i[:, None] * rn_j[None, :]
    valid = col_mask[None, :] & (cols[None, :] != rows[:, None])
    return tl.where(valid, x, float("-inf"))


@triton.jit
def _online_update(x, m_i, l_i):
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows: all -inf
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _nt_xent_fwd_kernel(z1_ptr, z2_ptr, norm_ptr, temp_ptr, loss_ptr, lse_ptr, rank_ptr,
                        N, D, stride1, stride2, COMPUTE_RANK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Per row block: loss_i = lse_i - s_{i,p(i)} with lse over j != i (online, base 2).

    Row blocks never straddle row N and walk the columns starting at their positives
    p(i0) = i0 + N mod M, so (BLOCK_N >= BLOCK_M) every positive sits in the first tile, on
    its row's own local column: the positive logit and the rank compare the very same numbers.
    """
    M = 2 * N
    blocks_per_half = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    half = pid // blocks_per_half
    i0 = half * N + (pid % blocks_per_half) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = i0 + offs_m
    row_mask = rows < (half + 1) * N
    p0 = (i0 + N) % M
    scale = LOG2E_C / tl.load(temp_ptr).to(tl.float32)
    scale_i = scale / tl.load(norm_ptr + rows, mask=row_mask, other=1.0)

    x = _fwd_logits(z1_ptr, z2_ptr, norm_ptr, rows, row_mask, scale_i, p0, 0, N, D, stride1,
                    stride2, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    on_diag = offs_m[:, None] == tl.arange(0, BLOCK_N)[None, :]
    pos = tl.sum(tl.where(on_diag, x, 0.0), axis=1)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i, l_i = _online_update(x, m_i, l_i)
    rank = tl.zeros((BLOCK_M,), dtype=tl.int32)
    if COMPUTE_RANK:
        rank += tl.sum((x > pos[:, None]).to(tl.int32), axis=1)
    for t in range(1, tl.cdiv(M, BLOCK_N)):
        x = _fwd_logits(z1_ptr, z2_ptr, norm_ptr, rows, row_mask, scale_i, p0, t, N, D,
                        stride1, stride2, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        m_i, l_i = _online_update(x, m_i, l_i)
        if COMPUTE_RANK:
            rank += tl.sum((x > pos[:, None]).to(tl.int32), axis=1)
    lse2 = m_i + tl.log2(l_i)
    tl.store(lse_ptr + rows, lse2 * LN2_C, mask=row_mask)
    tl.store(loss_ptr + rows, (lse2 - pos) * LN2_C, mask=row_mask)
    if COMPUTE_RANK:
        tl.store(rank_ptr + rows, rank, mask=row_mask)


@triton.jit
def _nt_xent_bwd_kernel(z1_ptr, z2_ptr, norm_ptr, temp_ptr, lse_ptr, w_ptr, g_ptr, tpart_ptr,
                        N, D, stride1, stride2, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    """Tile pair (I, J), I <= J: A = w_i P_ij + w_j P_ji from one recomputed tile; G_I += A u_J
    and (I < J) G_J += A^T u_I, as fp32 atomics; sum_ij A_ij s_ij to tpart[I, J]."""
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    if bi > bj:
        return
    M = 2 * N
    rows_i = bi * BLOCK + tl.arange(0, BLOCK)
    rows_j = bj * BLOCK + tl.arange(0, BLOCK)
    mask_i = rows_i < M
    mask_j = rows_j < M
    inv_tau = 1.0 / tl.load(temp_ptr).to(tl.float32)
    rn_i = 1.0 / tl.load(norm_ptr + rows_i, mask=mask_i, other=1.0)
    rn_j = 1.0 / tl.load(norm_ptr + rows_j, mask=mask_j, other=1.0)
    acc = _dot_tile(z1_ptr, z2_ptr, rows_i, mask_i, rows_j, mask_j, N, D, stride1, stride2,
                    BLOCK, BLOCK, BLOCK_D, PRECISION)
    s = acc * (rn_i * inv_tau)[:, None] * rn_j[None, :]
    lse_i = tl.load(lse_ptr + rows_i, mask=mask_i, other=0.0)
    lse_j = tl.load(lse_ptr + rows_j, mask=mask_j, other=0.0)
    w_i = tl.load(w_ptr + rows_i, mask=mask_i, other=0.0)
    w_j = tl.load(w_ptr + rows_j, mask=mask_j, other=0.0)
    valid = mask_i[:, None] & mask_j[None, :] & (rows_i[:, None] != rows_j[None, :])
    # Masked entries go through exp2 at -inf (=> 0), never at s_ii = 1/tau (which overflows).
    s2 = tl.where(valid, s * LOG2E_C, float("-inf"))
    a = (w_i[:, None] * tl.exp2(s2 - (lse_i * LOG2E_C)[:, None])
         + w_j[None, :] * tl.exp2(s2 - (lse_j * LOG2E_C)[None, :]))
    a = tl.where(valid, a, 0.0)
    tsum = tl.sum(tl.sum(a * tl.where(valid, s, 0.0), axis=1), axis=0)
    if bi == bj:
        tsum = tsum * 0.5
    tl.store(tpart_ptr + bi * tl.num_programs(1) + bj, tsum)
    # G_I += (A * rn_j) z_J and G_J += (A * rn_i)^T z_I, on tensor cores from the raw
    # input-dtype rows. The A tiles (~w * P, often ~1e-6) are cast to the input dtype after a
    # power-of-two rescale to ~1, undone on the fp32 product: fp16 would otherwise
    # flush them to subnormals.
    a_j = a * rn_j[None, :]
    c_j = _pow2_scale(a_j)
    a_j = (a_j * c_j).to(z1_ptr.dtype.element_ty)
    a_i = tl.trans(a * rn_i[:, None])
    c_i = _pow2_scale(a_i)
    a_i = (a_i * c_i).to(z1_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d[None, :] < D
        z_j = _load_rows(z1_ptr, z2_ptr, rows_j, mask_j, offs_d, N, D, stride1, stride2)
        gi = tl.dot(a_j, z_j, input_precision=PRECISION) / c_j
        tl.atomic_add(g_ptr + rows_i[:, None] * D + offs_d[None, :], gi,
                      mask=mask_i[:, None] & d_mask)
        if bi != bj:
            z_i = _load_rows(z1_ptr, z2_ptr, rows_i, mask_i, offs_d, N, D, stride1, stride2)
            gj = tl.dot(a_i, z_i, input_precision=PRECISION) / c_i
            tl.atomic_add(g_ptr + rows_j[:, None] * D + offs_d[None, :], gj,
                          mask=mask_j[:, None] & d_mask)


@triton.jit
def _nt_xent_finish_kernel(z1_ptr, z2_ptr, norm_ptr, temp_ptr, w_ptr, g_ptr, gz1_ptr, gz2_ptr,
                           ppart_ptr, N, D, stride1, stride2, gstride1, gstride2,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_u_i = (G_i - (w_i + w_p(i)) u_p(i)) / tau; grad_z_i = (grad_u_i - (u_i . grad_u_i)
    u_i) / norm_i (or grad_u_i / eps where the norm was clamped, as F.normalize); and the
    block's sum of w_i s_{i,p(i)} for the temperature gradient."""
    M = 2 * N
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    prow = (rows + N) % M
    inv_tau = 1.0 / tl.load(temp_ptr).to(tl.float32)
    norm_i = tl.load(norm_ptr + rows, mask=row_mask, other=1.0)
    rn_i = 1.0 / norm_i
    rn_p = 1.0 / tl.load(norm_ptr + prow, mask=row_mask, other=1.0)
    w_i = tl.load(w_ptr + rows, mask=row_mask, other=0.0)
    wpos = w_i + tl.load(w_ptr + prow, mask=row_mask, other=0.0)
    dot_gu = tl.zeros((BLOCK_R,), dtype=tl.float32)
    dot_up = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs_d[None, :] < D)
        u_i = _load_rows(z1_ptr, z2_ptr, rows, row_mask, offs_d, N, D, stride1, stride2).to(tl.float32) * rn_i[:, None]
        u_p = _load_rows(z1_ptr, z2_ptr, prow, row_mask, offs_d, N, D, stride1, stride2).to(tl.float32) * rn_p[:, None]
        g = tl.load(g_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        gu = inv_tau * (g - wpos[:, None] * u_p)
        dot_gu += tl.sum(u_i * gu, axis=1)
        dot_up += tl.sum(u_i * u_p, axis=1)
    keep_radial = tl.where(norm_i <= NORM_EPS_C, 0.0, 1.0)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs_d[None, :] < D)
        u_i = _load_rows(z1_ptr, z2_ptr, rows, row_mask, offs_d, N, D, stride1, stride2).to(tl.float32) * rn_i[:, None]
        u_p = _load_rows(z1_ptr, z2_ptr, prow, row_mask, offs_d, N, D, stride1, stride2).to(tl.float32) * rn_p[:, None]
        g = tl.load(g_ptr + rows[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        gu = inv_tau * (g - wpos[:, None] * u_p)
        gz = ((gu - (keep_radial * dot_gu)[:, None] * u_i) * rn_i[:, None]).to(gz1_ptr.dtype.element_ty)
        tl.store(gz1_ptr + rows[:, None] * gstride1 + offs_d[None, :], gz,
                 mask=mask & (rows < N)[:, None])
        tl.store(gz2_ptr + (rows - N)[:, None] * gstride2 + offs_d[None, :], gz,
                 mask=mask & (rows >= N)[:, None])
    tl.store(ppart_ptr + tl.program_id(0), tl.sum(w_i * dot_up * inv_tau, axis=0))


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _config(m: int, d: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Launch configuration by shape (no autotuning: it would cost the first step dearly).

    Tile sizes are powers of two >= 16 (tl.dot's minimum). Under the interpreter, small tiles
    keep the numpy emulation fast. On a GPU: 128-row tiles, the whole feature dimension in one
    or two chunks for D <= 128 and 64-wide chunks beyond.
    """
    if interpret:
        block = 16 if m <= 64 else 64
        return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_BWD=block,
                    BLOCK_D=min(64, _pow2_at_least(d)), num_warps=4, num_stages=1)
    block_d = min(128 if d <= 128 else 64, _pow2_at_least(d))
    small = m <= 512
    return dict(BLOCK_M=64 if small else 128, BLOCK_N=64 if small else 128,
                BLOCK_BWD=64 if small else 128, BLOCK_D=block_d,
                num_warps=4 if small else 8, num_stages=2 if dtype == torch.float32 else 3)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: three TF32 products recover ~fp32 accuracy on tensor cores.
    return "tf32x3" if dtype == torch.float32 else "ieee"


@triton_op("fastclr::nt_xent_triton_forward", mutates_args=())
def nt_xent_forward(z1: torch.Tensor, z2: torch.Tensor, temperature: torch.Tensor,
                    compute_accuracy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_loss, lse, norm, rank) as fastclr::nt_xent_forward, by the Triton kernels."""
    n, d = z1.shape
    m = 2 * n
    z1, z2 = z1.contiguous(), z2.contiguous()
    cfg = _config(m, d, z1.dtype, INTERPRETED)
    norm = torch.empty(m, device=z1.device, dtype=torch.float32)
    lse = torch.empty_like(norm)
    loss = torch.empty_like(norm)
    rank = torch.empty(m if compute_accuracy else 0, device=z1.device, dtype=torch.int32)
    wrap_triton(_nt_xent_norm_kernel)[(triton.cdiv(m, 64),)](
        z1, z2, norm, n, d, z1.stride(0), z2.stride(0), BLOCK_R=64,
        BLOCK_D=min(128, _pow2_at_least(d)))
    bm = cfg["BLOCK_M"]
    grid = (2 * triton.cdiv(n, bm),)
    wrap_triton(_nt_xent_fwd_kernel)[grid](
        z1, z2, norm, temperature, loss, lse, rank, n, d, z1.stride(0), z2.stride(0),
        COMPUTE_RANK=compute_accuracy, BLOCK_M=bm, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_D=cfg["BLOCK_D"], PRECISION=_precision(z1.dtype), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return loss, lse, norm, rank


@triton_op("fastclr::nt_xent_triton_backward", mutates_args=())
def nt_xent_backward(grad_rows: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                     temperature: torch.Tensor, norm: torch.Tensor,
                     lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_z1, grad_z2, grad_temperature) as fastclr::nt_xent_backward, by Triton."""
    n, d = z1.shape
    m = 2 * n
    z1, z2 = z1.contiguous(), z2.contiguous()
    w = grad_rows.to(torch.float32).contiguous()
    cfg = _config(m, d, z1.dtype, INTERPRETED)
    block = cfg["BLOCK_BWD"]
    nb = triton.cdiv(m, block)
    g = torch.zeros(m, d, device=z1.device, dtype=torch.float32)
    tpart = torch.zeros(nb, nb, device=z1.device, dtype=torch.float32)
    wrap_triton(_nt_xent_bwd_kernel)[(nb, nb)](
        z1, z2, norm, temperature, lse, w, g, tpart, n, d, z1.stride(0), z2.stride(0),
        BLOCK=block, BLOCK_D=cfg["BLOCK_D"], PRECISION=_precision(z1.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grad_z1 = torch.empty_like(z1)
    grad_z2 = torch.empty_like(z2)
    block_r = 32
    ppart = torch.empty(triton.cdiv(m, block_r), device=z1.device, dtype=torch.float32)
    wrap_triton(_nt_xent_finish_kernel)[(triton.cdiv(m, block_r),)](
        z1, z2, norm, temperature, w, g, grad_z1, grad_z2, ppart, n, d, z1.stride(0),
        z2.stride(0), grad_z1.stride(0), grad_z2.stride(0), BLOCK_R=block_r,
        BLOCK_D=min(64, _pow2_at_least(d)))
    # dL/dtau = -(1/tau) * (sum_ij w_i P_ij s_ij - sum_i w_i s_{i,p(i)})
    grad_t = -(tpart.sum() - ppart.sum()) / temperature.to(torch.float32)
    return grad_z1, grad_z2, grad_t


def _setup_context(ctx, inputs, output):
    z1, z2, temperature, _ = inputs
    _, lse, norm, _ = output
    ctx.save_for_backward(z1, z2, temperature, norm, lse)


def _backward(ctx, grad_rows, _grad_lse, _grad_norm, _grad_rank):
    z1, z2, temperature, norm, lse = ctx.saved_tensors
    if grad_rows is None:
        return None, None, None, None
    grad_z1, grad_z2, grad_t = nt_xent_backward(grad_rows, z1, z2, temperature, norm, lse)
    grad_t = grad_t.to(temperature.dtype) if ctx.needs_input_grad[2] else None
    return grad_z1, grad_z2, grad_t, None


nt_xent_forward.register_autograd(_backward, setup_context=_setup_context)
