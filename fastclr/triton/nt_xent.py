"""Triton NT-Xent: fused normalisation + similarity + online logsumexp, memory-lean backward.

Kernels (formulas of DESIGN.md; z = [z1; z2], M = 2N rows, u = z / max(||z||, 1e-12)):

- ``_nt_xent_norm_kernel``: norm_i = max(||z_i||, 1e-12).                    memory O(M)
- ``_nt_xent_fwd_kernel``: per row block, stream column tiles of s = u u^T / tau with an
  online logsumexp (base 2); the positive logit and the ranks (#negatives above the positive,
  among all and among the other view's rows) come from the same tiles. Saves lse (M floats);
  never anything M x M.
- ``_nt_xent_bwd_rows_kernel`` (D <= 256) / ``_nt_xent_bwd_pairs_kernel`` (any D): for the
  tiles I <= J only, recompute S_IJ from raw z and the norms, A_ij = w_i P_ij + w_j P_ji with
  P = exp(s - lse) over the negatives j != i, p(i) -- one tile serves both P_IJ and P_JI --
  and accumulate G_I += A_IJ u_J, G_J += A_IJ^T u_I (fp32; the rows kernel keeps G_I in
  registers, atomics for the rest), the negatives' mass Q_i = sum_j P_ij and the tile's sum
  A_ij s_ij for the temperature gradient.                                    memory O(M D)
- ``_nt_xent_finish_kernel``: grad_u_i = (G_i - (w_i Q_i + w_p(i) Q_p(i)) u_p(i)) / tau, then
  the normalisation's Jacobian (F.normalize semantics), written in the input dtype. Q = 1 -
  P_{i,p(i)} is summed, never subtracted: on a saturated batch (P_ip ~ 1) 1 - P would cancel.

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
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from fastclr._autograd import autograd_formula

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
NORM_EPS = 1e-12

# The same constants as compile-time globals for the kernels.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
NORM_EPS_C = tl.constexpr(NORM_EPS)


# triton decides at @triton.jit time whether a kernel is interpreted (CPU tensors) or
# compiled for a GPU, so this is fixed when this module is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Autotuning applies to compiled kernels only.
AUTOTUNE = os.environ.get("FASTCLR_AUTOTUNE", "0") == "1" and not INTERPRETED


def _launcher(kernel):
    """wrap_triton(kernel): the launch torch.compile and opcheck can trace. Interpreted kernels
    that this torch's wrap_triton rejects (torch 2.11 takes only JITFunction / Autotuner, and
    triton 3.6's interpreter makes neither) are launched directly."""
    if INTERPRETED and not isinstance(kernel, (JITFunction, Autotuner)):
        return kernel
    return wrap_triton(kernel)


@triton.jit
def _row_offset(rows, stride):
    """rows * stride in 64 bits: M x D (or M x K) elements can pass 2^31 (M = 2^21 at D = 1024),
    where int32 offsets would wrap and address out of bounds."""
    return rows.to(tl.int64) * stride


@triton.jit
def _load_rows(z1_ptr, z2_ptr, rows, row_mask, offs_d, N, D, stride1, stride2):
    """Rows of z = [z1; z2] (rows < N from z1, the rest from z2), columns offs_d, 0 outside.
    One row pointer per row, chosen between the two tensors, then one load: two masked 2-D
    loads cost twice the pointer registers (and spilled, in sm_90 compiles)."""
    in_z1 = rows < N
    base = tl.where(in_z1, z1_ptr + _row_offset(rows, stride1),
                    z2_ptr + _row_offset(tl.where(in_z1, 0, rows - N), stride2))
    mask = row_mask[:, None] & (offs_d[None, :] < D)
    return tl.load(base[:, None] + offs_d[None, :], mask=mask, other=0.0)


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
def _log1p(y):
    """log(1 + y) accurate for small y (y >= 0): log(u) * y / (u - 1) with u = 1 + y rounded, which
    cancels u's rounding error (Goldberg's trick); y itself where u rounds to 1."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _count_above(x, pos, p0, t, half, N, BLOCK_N: tl.constexpr):
    """Per row: the columns of tile t scoring above the positive, among all (the self and padding
    are -inf) and among the other view's rows alone (google-research/simclr's contrast_acc)."""
    cols = (p0 + t * BLOCK_N + tl.arange(0, BLOCK_N)) % (2 * N)
    cross = (cols >= N) == (half == 0)
    hit = x > pos[:, None]
    return (tl.sum(hit.to(tl.int32), axis=1),
            tl.sum((hit & cross[None, :]).to(tl.int32), axis=1))


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
    """Per row block: loss_i = lse_i - s_{i,p(i)} with lse over j != i, formed from the online
    logsumexp over the negatives alone (base 2) as log(1 + exp(lse_neg - s_ip)).

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
    x = tl.where(on_diag, float("-inf"), x)  # the logsumexp runs over the negatives alone
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i, l_i = _online_update(x, m_i, l_i)
    rank = tl.zeros((BLOCK_M,), dtype=tl.int32)
    rank_x = tl.zeros((BLOCK_M,), dtype=tl.int32)  # the other view's columns alone
    if COMPUTE_RANK:
        above, above_x = _count_above(x, pos, p0, 0, half, N, BLOCK_N)
        rank += above
        rank_x += above_x
    for t in range(1, tl.cdiv(M, BLOCK_N)):
        x = _fwd_logits(z1_ptr, z2_ptr, norm_ptr, rows, row_mask, scale_i, p0, t, N, D,
                        stride1, stride2, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        m_i, l_i = _online_update(x, m_i, l_i)
        if COMPUTE_RANK:
            above, above_x = _count_above(x, pos, p0, t, half, N, BLOCK_N)
            rank += above
            rank_x += above_x
    # loss = log(1 + 2^(lse2_neg - pos)) and lse = pos + loss, without the cancellation of
    # lse - pos when the positive dominates; 0 when there is no negative (N = 1).
    x2 = tl.where(m_i == float("-inf"), float("-inf"), m_i + tl.log2(l_i)) - pos
    loss = tl.maximum(x2, 0.0) * LN2_C + _log1p(tl.exp2(-tl.abs(x2)))
    tl.store(lse_ptr + rows, pos * LN2_C + loss, mask=row_mask)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    if COMPUTE_RANK:
        tl.store(rank_ptr + rows, rank, mask=row_mask)
        tl.store(rank_ptr + M + rows, rank_x, mask=row_mask)


@triton.jit
def _bwd_a_tile(acc, bi, bj, rows_i, mask_i, rows_j, mask_j, rn_i, rn_j, inv_tau, lse_ptr, w_ptr,
                N):
    """From the tile (bi, bj) of raw dot products, over the negatives only (0 on the diagonal,
    the positive pairs and padding): A_ij = w_i P_ij + w_j P_ji; the tile's sum of A_ij s_ij
    (halved on a diagonal tile, where A holds both (i, j) and (j, i)); and the negatives'
    probability mass per row, sum_j P_ij, and per column, sum_i P_ji (the tile's parts of
    Q = 1 - P_{i,p(i)}, formed without that cancellation)."""
    s = acc * (rn_i * inv_tau)[:, None] * rn_j[None, :]
    lse_i = tl.load(lse_ptr + rows_i, mask=mask_i, other=0.0)
    lse_j = tl.load(lse_ptr + rows_j, mask=mask_j, other=0.0)
    w_i = tl.load(w_ptr + rows_i, mask=mask_i, other=0.0)
    w_j = tl.load(w_ptr + rows_j, mask=mask_j, other=0.0)
    pos_i = (rows_i + N) % (2 * N)
    valid = (mask_i[:, None] & mask_j[None, :] & (rows_i[:, None] != rows_j[None, :])
             & (rows_j[None, :] != pos_i[:, None]))
    # Masked entries go through exp2 at -inf (=> 0), never at s_ii = 1/tau (which overflows).
    s2 = tl.where(valid, s * LOG2E_C, float("-inf"))
    p_ij = tl.exp2(s2 - (lse_i * LOG2E_C)[:, None])
    p_ji = tl.exp2(s2 - (lse_j * LOG2E_C)[None, :])
    a = tl.where(valid, w_i[:, None] * p_ij + w_j[None, :] * p_ji, 0.0)
    tsum = tl.sum(tl.sum(a * tl.where(valid, s, 0.0), axis=1), axis=0)
    return a, tl.where(bi == bj, 0.5 * tsum, tsum), tl.sum(p_ij, axis=1), tl.sum(p_ji, axis=0)


@triton.jit
def _scaled_cast(x, dtype: tl.constexpr):
    """x rescaled by a power of two c to a largest entry of ~1, cast to dtype; and c. The A
    tiles (~w * P, often ~1e-6) would otherwise be flushed to subnormals by fp16; the fp32
    product is divided by c again."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    c = tl.where(amax > 0, tl.exp2(-tl.ceil(tl.log2(tl.maximum(amax, 1e-30)))), 1.0)
    return (x * c).to(dtype), c


@triton.jit
def _nt_xent_bwd_rows_kernel(z1_ptr, z2_ptr, norm_ptr, temp_ptr, lse_ptr, w_ptr, g_ptr, q_ptr,
                             tpart_ptr, N, D, stride1, stride2, BLOCK: tl.constexpr,
                             BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Backward for D <= BLOCK_D (the whole feature dimension in registers). Program I walks the
    tiles J >= I of its block row: its own rows' gradient G_I += A_IJ u_J stays in registers
    (one atomic add at the end), the other side's G_J += A_IJ^T u_I is an fp32 atomic add; the
    negatives' mass Q likewise. Each row of z is loaded once per tile. Programs are numbered
    longest-first."""
    M = 2 * N
    nb = tl.cdiv(M, BLOCK)
    bi = nb - 1 - tl.program_id(0)
    rows_i = bi * BLOCK + tl.arange(0, BLOCK)
    mask_i = rows_i < M
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d[None, :] < D
    inv_tau = 1.0 / tl.load(temp_ptr).to(tl.float32)
    rn_i = 1.0 / tl.load(norm_ptr + rows_i, mask=mask_i, other=1.0)
    z_i = _load_rows(z1_ptr, z2_ptr, rows_i, mask_i, offs_d, N, D, stride1, stride2)
    g_i = tl.zeros((BLOCK, BLOCK_D), dtype=tl.float32)
    q_i = tl.zeros((BLOCK,), dtype=tl.float32)
    total = tl.zeros((), dtype=tl.float32)
    for bj in range(bi, nb):
        rows_j = bj * BLOCK + tl.arange(0, BLOCK)
        mask_j = rows_j < M
        rn_j = 1.0 / tl.load(norm_ptr + rows_j, mask=mask_j, other=1.0)
        z_j = _load_rows(z1_ptr, z2_ptr, rows_j, mask_j, offs_d, N, D, stride1, stride2)
        acc = tl.dot(z_i, tl.trans(z_j), input_precision=PRECISION)
        a, tsum, q_row, q_col = _bwd_a_tile(acc, bi, bj, rows_i, mask_i, rows_j, mask_j, rn_i,
                                            rn_j, inv_tau, lse_ptr, w_ptr, N)
        q_i += q_row
        if bj != bi:
            a_i, c_i = _scaled_cast(tl.trans(a * rn_i[:, None]), z1_ptr.dtype.element_ty)
            g_j = tl.dot(a_i, z_i, input_precision=PRECISION) / c_i
            tl.atomic_add(g_ptr + _row_offset(rows_j, D)[:, None] + offs_d[None, :], g_j,
                          mask=mask_j[:, None] & d_mask)
            tl.atomic_add(q_ptr + rows_j, q_col, mask=mask_j)
        total += tsum
        a_j, c_j = _scaled_cast(a * rn_j[None, :], z1_ptr.dtype.element_ty)
        g_i += tl.dot(a_j, z_j, input_precision=PRECISION) / c_j
    tl.atomic_add(g_ptr + _row_offset(rows_i, D)[:, None] + offs_d[None, :], g_i,
                  mask=mask_i[:, None] & d_mask)
    tl.atomic_add(q_ptr + rows_i, q_i, mask=mask_i)
    tl.store(tpart_ptr + bi, total)


@triton.jit
def _nt_xent_bwd_pairs_kernel(z1_ptr, z2_ptr, norm_ptr, temp_ptr, lse_ptr, w_ptr, g_ptr, q_ptr,
                              tpart_ptr, N, D, stride1, stride2, BLOCK: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Backward for any D: one program per tile pair (I, J), I <= J, looping over D chunks;
    G_I += A u_J and (I < J) G_J += A^T u_I as fp32 atomic adds, Q likewise; sum A s to
    tpart[I, J]."""
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
    a, tsum, q_row, q_col = _bwd_a_tile(acc, bi, bj, rows_i, mask_i, rows_j, mask_j, rn_i, rn_j,
                                        inv_tau, lse_ptr, w_ptr, N)
    tl.store(tpart_ptr + bi * tl.num_programs(1) + bj, tsum)
    tl.atomic_add(q_ptr + rows_i, q_row, mask=mask_i)
    if bi != bj:
        tl.atomic_add(q_ptr + rows_j, q_col, mask=mask_j)
    a_j, c_j = _scaled_cast(a * rn_j[None, :], z1_ptr.dtype.element_ty)
    a_i, c_i = _scaled_cast(tl.trans(a * rn_i[:, None]), z1_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d[None, :] < D
        z_j = _load_rows(z1_ptr, z2_ptr, rows_j, mask_j, offs_d, N, D, stride1, stride2)
        g_i = tl.dot(a_j, z_j, input_precision=PRECISION) / c_j
        tl.atomic_add(g_ptr + _row_offset(rows_i, D)[:, None] + offs_d[None, :], g_i,
                      mask=mask_i[:, None] & d_mask)
        if bi != bj:
            z_i = _load_rows(z1_ptr, z2_ptr, rows_i, mask_i, offs_d, N, D, stride1, stride2)
            g_j = tl.dot(a_i, z_i, input_precision=PRECISION) / c_i
            tl.atomic_add(g_ptr + _row_offset(rows_j, D)[:, None] + offs_d[None, :], g_j,
                          mask=mask_j[:, None] & d_mask)


@triton.jit
def _finish_chunk(z1_ptr, z2_ptr, g_ptr, rows, prow, row_mask, offs_d, rn_i, rn_p, wpos, inv_tau,
                  N, D, stride1, stride2):
    """One feature chunk of u_i, u_p(i) and grad_u_i = (G_i - wpos_i u_p(i)) / tau."""
    mask = row_mask[:, None] & (offs_d[None, :] < D)
    u_i = _load_rows(z1_ptr, z2_ptr, rows, row_mask, offs_d, N, D, stride1, stride2).to(tl.float32) * rn_i[:, None]
    u_p = _load_rows(z1_ptr, z2_ptr, prow, row_mask, offs_d, N, D, stride1, stride2).to(tl.float32) * rn_p[:, None]
    g = tl.load(g_ptr + _row_offset(rows, D)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return u_i, u_p, inv_tau * (g - wpos[:, None] * u_p), mask


@triton.jit
def _nt_xent_finish_kernel(z1_ptr, z2_ptr, norm_ptr, temp_ptr, w_ptr, g_ptr, q_ptr, gz1_ptr,
                           gz2_ptr, ppart_ptr, N, D, stride1, stride2, gstride1, gstride2,
                           BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_u_i = (G_i - (w_i Q_i + w_p(i) Q_p(i)) u_p(i)) / tau, with Q = 1 - P_{i,p(i)} the
    negatives' mass; grad_z_i = (grad_u_i - (u_i . grad_u_i) u_i) / norm_i (or grad_u_i / eps
    where the norm was clamped, as F.normalize); and the block's sum of w_i Q_i s_{i,p(i)} for
    the temperature gradient."""
    M = 2 * N
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    prow = (rows + N) % M
    inv_tau = 1.0 / tl.load(temp_ptr).to(tl.float32)
    norm_i = tl.load(norm_ptr + rows, mask=row_mask, other=1.0)
    rn_i = 1.0 / norm_i
    rn_p = 1.0 / tl.load(norm_ptr + prow, mask=row_mask, other=1.0)
    wq_i = tl.load(w_ptr + rows, mask=row_mask, other=0.0) * tl.load(q_ptr + rows, mask=row_mask, other=0.0)
    wpos = wq_i + tl.load(w_ptr + prow, mask=row_mask, other=0.0) * tl.load(q_ptr + prow, mask=row_mask, other=0.0)
    dot_gu = tl.zeros((BLOCK_R,), dtype=tl.float32)
    dot_up = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        u_i, u_p, gu, _ = _finish_chunk(z1_ptr, z2_ptr, g_ptr, rows, prow, row_mask,
                                        k0 + tl.arange(0, BLOCK_D), rn_i, rn_p, wpos, inv_tau,
                                        N, D, stride1, stride2)
        dot_gu += tl.sum(u_i * gu, axis=1)
        dot_up += tl.sum(u_i * u_p, axis=1)
    keep_radial = tl.where(norm_i <= NORM_EPS_C, 0.0, 1.0)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        u_i, _, gu, mask = _finish_chunk(z1_ptr, z2_ptr, g_ptr, rows, prow, row_mask, offs_d, rn_i,
                                         rn_p, wpos, inv_tau, N, D, stride1, stride2)
        gz = ((gu - (keep_radial * dot_gu)[:, None] * u_i) * rn_i[:, None]).to(gz1_ptr.dtype.element_ty)
        tl.store(gz1_ptr + _row_offset(rows, gstride1)[:, None] + offs_d[None, :], gz,
                 mask=mask & (rows < N)[:, None])
        tl.store(gz2_ptr + _row_offset(rows - N, gstride2)[:, None] + offs_d[None, :], gz,
                 mask=mask & (rows >= N)[:, None])
    tl.store(ppart_ptr + tl.program_id(0), tl.sum(wq_i * dot_up * inv_tau, axis=0))


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


# Up to this padded feature width the backward keeps a row block's gradient in registers.
ROWS_MAX_D = 256


def _config(m: int, d: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Launch configuration by shape (no autotuning: it would cost the first step dearly).

    Tile sizes are powers of two >= 16 (tl.dot's minimum). Under the interpreter, big tiles
    keep the numpy emulation fast. On a GPU: 64-row tiles, the feature dimension in chunks of
    up to 128; the register-resident backward takes the whole padded width at once.
    """
    d_pad = _pow2_at_least(d)
    rows_bwd = d_pad <= ROWS_MAX_D
    if interpret:
        block = 16 if m <= 64 else 64
        return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_BWD=block, BLOCK_D=min(64, d_pad),
                    BLOCK_D_BWD=d_pad if rows_bwd else min(64, d_pad), ROWS_BWD=rows_bwd,
                    num_warps=4, num_stages=1)
    # 64 x 64 tiles with 8 warps: in ahead-of-time sm_90 compiles (ptxas -v) the 128-row tiles
    # spilled 0.9-1.7 KB of registers per thread in the forward and 1.4 KB in the backward;
    # these spill nothing (forward) or 20 bytes (backward). Not yet timed on a GPU.
    if dtype == torch.float32:
        # 3xTF32 keeps hi/lo copies of every operand tile: one stage, 64-wide K chunks, and the
        # register-resident backward only up to D = 128, to stay within shared memory.
        rows_bwd = d_pad <= 128
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_BWD=64, BLOCK_D=min(64, d_pad),
                    BLOCK_D_BWD=d_pad if rows_bwd else 64, ROWS_BWD=rows_bwd,
                    num_warps=8, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_BWD=64, BLOCK_D=min(128 if d <= 128 else 64, d_pad),
                BLOCK_D_BWD=d_pad if rows_bwd else 64, ROWS_BWD=rows_bwd,
                num_warps=8, num_stages=3)


def _tuning_configs(kind: str) -> list:
    """Candidate launch configurations for FASTCLR_AUTOTUNE=1. Forward: BLOCK_N >= BLOCK_M
    always (every positive of a row block must sit in its first column tile). The
    register-resident backward ("rows") keeps its BLOCK_D = the padded feature width."""
    out = []
    for bm in (64, 128):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                if kind == "rows":
                    out.append(triton.Config({"BLOCK": bm}, num_warps=warps, num_stages=stages))
                    continue
                for bd in (64, 128):
                    if kind == "pairs":
                        out.append(triton.Config({"BLOCK": bm, "BLOCK_D": bd}, num_warps=warps,
                                                 num_stages=stages))
                        continue
                    for bn in (64, 128):
                        if bn >= bm:
                            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd},
                                                     num_warps=warps, num_stages=stages))
    return out


if AUTOTUNE:
    # The backward accumulates with atomics: every trial starts again from zeros.
    _fwd_tuned = triton.autotune(configs=_tuning_configs("fwd"), key=["N", "D"])(_nt_xent_fwd_kernel)
    _bwd_rows_tuned = triton.autotune(configs=_tuning_configs("rows"), key=["N", "D"],
                                      reset_to_zero=["g_ptr", "q_ptr", "tpart_ptr"])(_nt_xent_bwd_rows_kernel)
    _bwd_pairs_tuned = triton.autotune(configs=_tuning_configs("pairs"), key=["N", "D"],
                                       reset_to_zero=["g_ptr", "q_ptr", "tpart_ptr"])(_nt_xent_bwd_pairs_kernel)


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
    rank = torch.empty((2, m) if compute_accuracy else (0,), device=z1.device, dtype=torch.int32)
    _launcher(_nt_xent_norm_kernel)[(triton.cdiv(m, 64),)](
        z1, z2, norm, n, d, z1.stride(0), z2.stride(0), BLOCK_R=64,
        BLOCK_D=min(128, _pow2_at_least(d)))
    args = (z1, z2, norm, temperature, loss, lse, rank, n, d, z1.stride(0), z2.stride(0))
    if AUTOTUNE:
        _launcher(_fwd_tuned)[lambda meta: (2 * triton.cdiv(n, meta["BLOCK_M"]),)](
            *args, COMPUTE_RANK=compute_accuracy, PRECISION=_precision(z1.dtype))
    else:
        _launcher(_nt_xent_fwd_kernel)[(2 * triton.cdiv(n, cfg["BLOCK_M"]),)](
            *args, COMPUTE_RANK=compute_accuracy, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
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
    g = torch.zeros(m, d, device=z1.device, dtype=torch.float32)
    q = torch.zeros(m, device=z1.device, dtype=torch.float32)
    # Sized for the smallest tile any configuration uses; unused entries stay 0.
    nb_max = triton.cdiv(m, 64 if AUTOTUNE else cfg["BLOCK_BWD"])
    tpart = torch.zeros(nb_max * nb_max, device=z1.device, dtype=torch.float32)
    args = (z1, z2, norm, temperature, lse, w, g, q, tpart, n, d, z1.stride(0), z2.stride(0))
    precision = _precision(z1.dtype)
    if cfg["ROWS_BWD"]:
        if AUTOTUNE:
            _launcher(_bwd_rows_tuned)[lambda meta: (triton.cdiv(m, meta["BLOCK"]),)](
                *args, BLOCK_D=cfg["BLOCK_D_BWD"], PRECISION=precision)
        else:
            _launcher(_nt_xent_bwd_rows_kernel)[(triton.cdiv(m, cfg["BLOCK_BWD"]),)](
                *args, BLOCK=cfg["BLOCK_BWD"], BLOCK_D=cfg["BLOCK_D_BWD"], PRECISION=precision,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    elif AUTOTUNE:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK"]), triton.cdiv(m, meta["BLOCK"]))  # noqa: E731
        _launcher(_bwd_pairs_tuned)[grid](*args, PRECISION=precision)
    else:
        nb = triton.cdiv(m, cfg["BLOCK_BWD"])
        _launcher(_nt_xent_bwd_pairs_kernel)[(nb, nb)](
            *args, BLOCK=cfg["BLOCK_BWD"], BLOCK_D=cfg["BLOCK_D_BWD"], PRECISION=precision,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grad_z1 = torch.empty_like(z1)
    grad_z2 = torch.empty_like(z2)
    block_r = 32
    ppart = torch.empty(triton.cdiv(m, block_r), device=z1.device, dtype=torch.float32)
    _launcher(_nt_xent_finish_kernel)[(triton.cdiv(m, block_r),)](
        z1, z2, norm, temperature, w, g, q, grad_z1, grad_z2, ppart, n, d, z1.stride(0),
        z2.stride(0), grad_z1.stride(0), grad_z2.stride(0), BLOCK_R=block_r,
        BLOCK_D=min(64, _pow2_at_least(d)))
    # dL/dtau = -(1/tau) * sum_i w_i (sum_{j != i, p(i)} P_ij s_ij - Q_i s_{i,p(i)})
    grad_t = -(tpart.sum() - ppart.sum()) / temperature.to(torch.float32)
    return grad_z1, grad_z2, grad_t


_backward, _setup_context = autograd_formula(nt_xent_backward)
nt_xent_forward.register_autograd(_backward, setup_context=_setup_context)
