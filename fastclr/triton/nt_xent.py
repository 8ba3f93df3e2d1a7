"""Triton NT-Xent and SupCon: fused normalisation + similarity + online logsumexp, lean backward.

Kernels (formulas of docs/math.md; rows z = [z1; z2], M of them, u = z / max(||z||, 1e-12)).
Positives: paired mode (NT-Xent, LABELS=False), p(i) = (i + N) mod M with M = 2N; labels mode,
every j != i of equal label. One body per kernel serves both (constexpr LABELS).

- ``_nt_xent_norm_kernel``: norm_i = max(||z_i||, 1e-12).                    memory O(M)
- ``_nt_xent_fwd_kernel``: per row block, stream column tiles of s = u u^T / tau with two
  online logsumexps (base 2), the negatives' and the positives', and the positives' sum and
  count; loss = log(1 + 2^(lse_neg - lse_pos)) [+ lse_pos - mean_pos], free of cancellation.
  Ranks (#negatives above the best positive): paired mode in the same sweep (the positive sits
  in the first tile), labels mode in a second sweep. Saves stats (4 x M floats: lse, lse_pos,
  Q = the negatives' softmax mass, |P|); never anything M x M.
- ``_nt_xent_bwd_rows_kernel`` (D <= 256) / ``_nt_xent_bwd_pairs_kernel`` (any D): for the
  tiles I <= J only, recompute S_IJ from raw z and the norms, A_ij = w_i c_ij + w_j c_ji with
  c = P = exp(s - lse) for a negative and c = -Q R [+ R - 1/|P|] for a positive, R = exp(s -
  lse_pos) -- one tile serves both rows and columns -- and accumulate G_I += A_IJ u_J,
  G_J += A_IJ^T u_I (fp32; the rows kernel keeps G_I in registers, atomics for the rest) and
  the tile's sum A_ij s_ij for the temperature gradient.                     memory O(M D)
- ``_nt_xent_finish_kernel``: grad_u = G / tau, then the normalisation's Jacobian (F.normalize
  semantics), written in the input dtype.

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
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from fastclr._autograd import autograd_formula
from fastclr._boundary import check_rows, local_rows, second_view
from fastclr.triton.common import (INTERPRETED, NORM_EPS, dot_precision, launcher, pow2_at_least,
                                   row_offset)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# The same constants as compile-time globals for the kernels.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
NORM_EPS_C = tl.constexpr(NORM_EPS)


# Autotuning applies to compiled kernels only.
AUTOTUNE = os.environ.get("FASTCLR_AUTOTUNE", "0") == "1" and not INTERPRETED


@triton.jit
def _load_rows(z1_ptr, z2_ptr, rows, row_mask, offs_d, N, D, stride1, stride2):
    """Rows of z = [z1; z2] (rows < N from z1, the rest from z2), columns offs_d, 0 outside.
    One row pointer per row, chosen between the two tensors, then one load: two masked 2-D
    loads cost twice the pointer registers (and spilled, in sm_90 compiles)."""
    in_z1 = rows < N
    base = tl.where(in_z1, z1_ptr + row_offset(rows, stride1),
                    z2_ptr + row_offset(tl.where(in_z1, 0, rows - N), stride2))
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
def _nt_xent_norm_kernel(z1_ptr, z2_ptr, norm_ptr, N, M, D, stride1, stride2,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """norm_i = max(||z_i||, 1e-12), accumulated in fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    sq = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        x = _load_rows(z1_ptr, z2_ptr, rows, row_mask, k0 + tl.arange(0, BLOCK_D), N, D,
                       stride1, stride2).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
    tl.store(norm_ptr + rows, tl.maximum(tl.sqrt(sq), 1e-12), mask=row_mask)


@triton.jit
def _fwd_logits(z1_ptr, z2_ptr, norm_ptr, rows, row_mask, scale_i, p0, t, N, M, D, stride1,
                stride2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """Column tile t of the rotated column order (columns p0 + t*BLOCK_N + ..., mod M) as
    base-2 logits s_ij * log2(e), with the self column and padding at -inf; and the columns."""
    lin = t * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (p0 + lin) % M
    col_mask = lin < M
    acc = _dot_tile(z1_ptr, z2_ptr, rows, row_mask, cols, col_mask, N, D, stride1, stride2,
                    BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
    rn_j = 1.0 / tl.load(norm_ptr + cols, mask=col_mask, other=1.0)
    x = acc * scale_i[:, None] * rn_j[None, :]
    valid = col_mask[None, :] & (cols[None, :] != rows[:, None])
    return tl.where(valid, x, float("-inf")), cols


@triton.jit
def _log1p(y):
    """log(1 + y) accurate for small y (y >= 0): log(u) * y / (u - 1) with u = 1 + y rounded, which
    cancels u's rounding error (Goldberg's trick); y itself where u rounds to 1."""
    u = 1.0 + y
    return tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))


@triton.jit
def _count_above(x, thresh, cols, part, N, LABELS: tl.constexpr):
    """Per row: the negatives of a tile (positives, self and padding at -inf in x) scoring above
    the row's best positive, among all and (paired mode) among the other view's rows alone
    (google-research/simclr's contrast_acc; labels mode counts all again)."""
    hit = x > thresh[:, None]
    if LABELS:
        cross = hit
    else:
        cross = hit & ((cols >= N) == (part == 0))[None, :]
    return tl.sum(hit.to(tl.int32), axis=1), tl.sum(cross.to(tl.int32), axis=1)


@triton.jit
def _safe(m):
    return tl.where(m == float("-inf"), 0.0, m)  # rows with nothing of a kind (yet): all -inf


@triton.jit
def _online_update(x, m_i, l_i):
    m_new = tl.maximum(m_i, tl.max(x, axis=1))
    m_safe = _safe(m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def _online_update_split(x, is_pos, m_n, l_n, m_p, l_p):
    """Both running logsumexps from one tile, one exp2 per entry: negatives (not is_pos) and
    positives (is_pos) each against their own running max."""
    mn_new = tl.maximum(m_n, tl.max(tl.where(is_pos, float("-inf"), x), axis=1))
    mp_new = tl.maximum(m_p, tl.max(tl.where(is_pos, x, float("-inf")), axis=1))
    mn_s, mp_s = _safe(mn_new), _safe(mp_new)
    e = tl.exp2(x - tl.where(is_pos, mp_s[:, None], mn_s[:, None]))
    l_n = l_n * tl.exp2(m_n - mn_s) + tl.sum(tl.where(is_pos, 0.0, e), axis=1)
    l_p = l_p * tl.exp2(m_p - mp_s) + tl.sum(tl.where(is_pos, e, 0.0), axis=1)
    return mn_new, l_n, mp_new, l_p


@triton.jit
def _label_positives(labels_ptr, rows, row_mask, cols, x):
    """Labels mode: the tile's positives, columns of the row's label (not self, not padding)."""
    lab_i = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    lab_j = tl.load(labels_ptr + cols)
    return (lab_i[:, None] == lab_j[None, :]) & (x > float("-inf"))


@triton.jit
def _nt_xent_fwd_kernel(z1_ptr, z2_ptr, labels_ptr, norm_ptr, temp_ptr, loss_ptr, stats_ptr,
                        rank_ptr, N, M, D, stride1, stride2, LO, COUNT, LABELS: tl.constexpr,
                        MEAN: tl.constexpr, COMPUTE_RANK: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Per row block: the online logsumexps (base 2) of the negatives and of the positives, the
    positives' sum and count; loss = log(1 + exp(lse_neg - lse_pos)) [+ lse_pos - mean_pos].

    Paired mode: row blocks never straddle row N and walk the columns starting at their
    positives p(i0) = i0 + N mod M, so (BLOCK_N >= BLOCK_M) every positive sits in the first
    tile, on its row's own local column: the positive logit and the rank compare the very same
    numbers, in one sweep. Labels mode: blocks over all M rows, columns in order; the ranks need
    the best positive, known after the sweep, so they take a second one. Only the local rows
    (i mod span in [LO, LO + COUNT)) have programs.
    """
    span = M if LABELS else N
    blocks_per_span = tl.cdiv(COUNT, BLOCK_M)
    pid = tl.program_id(0)
    part = pid // blocks_per_span
    first = part * span + LO
    i0 = first + (pid % blocks_per_span) * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = i0 + offs_m
    row_mask = rows < first + COUNT
    p0 = 0 if LABELS else (i0 + N) % M
    scale = LOG2E_C / tl.load(temp_ptr).to(tl.float32)
    scale_i = scale / tl.load(norm_ptr + rows, mask=row_mask, other=1.0)

    m_n = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_n = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_p = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rank = tl.zeros((BLOCK_M,), dtype=tl.int32)
    rank_x = tl.zeros((BLOCK_M,), dtype=tl.int32)  # the other view's columns alone
    if LABELS:
        for t in range(0, tl.cdiv(M, BLOCK_N)):
            x, cols = _fwd_logits(z1_ptr, z2_ptr, norm_ptr, rows, row_mask, scale_i, p0, t, N, M,
                                  D, stride1, stride2, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            is_pos = _label_positives(labels_ptr, rows, row_mask, cols, x)
            m_n, l_n, m_p, l_p = _online_update_split(x, is_pos, m_n, l_n, m_p, l_p)
            sum_p += tl.sum(tl.where(is_pos, x, 0.0), axis=1)
            cnt += tl.sum(is_pos.to(tl.float32), axis=1)
        if COMPUTE_RANK:
            for t in range(0, tl.cdiv(M, BLOCK_N)):
                x, cols = _fwd_logits(z1_ptr, z2_ptr, norm_ptr, rows, row_mask, scale_i, p0, t, N,
                                      M, D, stride1, stride2, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
                is_pos = _label_positives(labels_ptr, rows, row_mask, cols, x)
                above, above_x = _count_above(tl.where(is_pos, float("-inf"), x), m_p, cols,
                                              part, N, LABELS)
                rank += above
                rank_x += above_x
    else:
        x, cols = _fwd_logits(z1_ptr, z2_ptr, norm_ptr, rows, row_mask, scale_i, p0, 0, N, M, D,
                              stride1, stride2, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        on_diag = offs_m[:, None] == tl.arange(0, BLOCK_N)[None, :]
        m_p = tl.sum(tl.where(on_diag, x, 0.0), axis=1)
        l_p += 1.0
        sum_p = m_p
        cnt += 1.0
        x = tl.where(on_diag, float("-inf"), x)  # the negatives' logsumexp leaves it out
        m_n, l_n = _online_update(x, m_n, l_n)
        if COMPUTE_RANK:
            above, above_x = _count_above(x, m_p, cols, part, N, LABELS)
            rank += above
            rank_x += above_x
        for t in range(1, tl.cdiv(M, BLOCK_N)):
            x, cols = _fwd_logits(z1_ptr, z2_ptr, norm_ptr, rows, row_mask, scale_i, p0, t, N, M,
                                  D, stride1, stride2, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
            m_n, l_n = _online_update(x, m_n, l_n)
            if COMPUTE_RANK:
                above, above_x = _count_above(x, m_p, cols, part, N, LABELS)
                rank += above
                rank_x += above_x
    _store_row_results(loss_ptr, stats_ptr, rank_ptr, rows, row_mask, M, m_n, l_n, m_p, l_p, sum_p,
                       cnt, rank, rank_x, MEAN, COMPUTE_RANK)


@triton.jit
def _store_row_results(loss_ptr, stats_ptr, rank_ptr, rows, row_mask, M, m_n, l_n, m_p, l_p,
                       sum_p, cnt, rank, rank_x, MEAN: tl.constexpr, COMPUTE_RANK: tl.constexpr):
    """loss = log(1 + 2^x) [+ lse_pos - mean_pos] with x = lse2_neg - lse2_pos, lse = lse_pos +
    log(1 + 2^x), Q = sigmoid(x): no cancellation when the positives dominate; loss 0 without
    negatives (x = -inf) and for a row without a positive."""
    no_neg = m_n == float("-inf")
    lse2_n = tl.where(no_neg, float("-inf"), m_n + tl.log2(tl.where(no_neg, 1.0, l_n)))
    has = cnt > 0
    lse2_p = tl.where(has, m_p + tl.log2(tl.where(has, l_p, 1.0)), 0.0)
    x2 = lse2_n - lse2_p
    e = tl.exp2(-tl.abs(x2))
    softplus = tl.maximum(x2, 0.0) * LN2_C + _log1p(e)
    loss = softplus
    if MEAN:
        loss += (lse2_p - sum_p / tl.maximum(cnt, 1.0)) * LN2_C
    q = tl.where(x2 >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    tl.store(loss_ptr + rows, tl.where(has, loss, 0.0), mask=row_mask)
    tl.store(stats_ptr + rows, tl.where(has, lse2_p * LN2_C + softplus, lse2_n * LN2_C), mask=row_mask)
    tl.store(stats_ptr + M + rows, tl.where(has, lse2_p * LN2_C, float("-inf")), mask=row_mask)
    tl.store(stats_ptr + 2 * M + rows, tl.where(has, q, 1.0), mask=row_mask)
    tl.store(stats_ptr + 3 * M + rows, cnt, mask=row_mask)
    if COMPUTE_RANK:
        tl.store(rank_ptr + rows, rank, mask=row_mask)
        tl.store(rank_ptr + M + rows, rank_x, mask=row_mask)


@triton.jit
def _meets(b, BLOCK: tl.constexpr, LO, COUNT, N, LABELS: tl.constexpr):
    """Whether rows [b BLOCK, (b + 1) BLOCK) meet the local rows (one range with labels, one per
    view in paired mode): the tiles that meet none have A = 0 (both rows' weights are 0)."""
    b0 = b * BLOCK
    hit = (b0 < LO + COUNT) & (LO < b0 + BLOCK)
    if not LABELS:
        hit = hit | ((b0 < N + LO + COUNT) & (N + LO < b0 + BLOCK))
    return hit & (COUNT > 0)


@triton.jit
def _row_coefs(stats_ptr, w_ptr, rows, mask, M):
    """A row's backward constants: lse, lse_pos, Q, 1/|P| and its weight (0 without a positive)."""
    lse = tl.load(stats_ptr + rows, mask=mask, other=0.0)
    lpos = tl.load(stats_ptr + M + rows, mask=mask, other=0.0)
    q = tl.load(stats_ptr + 2 * M + rows, mask=mask, other=0.0)
    cnt = tl.load(stats_ptr + 3 * M + rows, mask=mask, other=0.0)
    w = tl.where(cnt > 0, tl.load(w_ptr + rows, mask=mask, other=0.0), 0.0)
    return lse, lpos, q, 1.0 / tl.maximum(cnt, 1.0), w


@triton.jit
def _coef(s2, is_pos, lse, lpos, q, inv_cnt, LABELS: tl.constexpr, MEAN: tl.constexpr):
    """dloss_i/ds_ij: P = exp(s - lse) for a negative; for a positive -Q R [+ R - 1/|P|], with R =
    exp(s - lse_pos) the positive's share among the positives (1 in paired mode, |P| = 1)."""
    if LABELS:
        e = tl.exp2(s2 - tl.where(is_pos, lpos, lse) * LOG2E_C)
        r = e
    else:
        e = tl.exp2(s2 - lse * LOG2E_C)
        r = 1.0
    c_pos = -q * r
    if MEAN:
        c_pos += r - inv_cnt
    return tl.where(is_pos, c_pos, e)


@triton.jit
def _bwd_a_tile(acc, bi, bj, rows_i, mask_i, rows_j, mask_j, rn_i, rn_j, inv_tau, stats_ptr,
                w_ptr, labels_ptr, N, M, LABELS: tl.constexpr, MEAN: tl.constexpr):
    """From the tile (bi, bj) of raw dot products: A_ij = w_i c_ij + w_j c_ji over j != i (0 on
    the diagonal and padding) and the tile's sum of A_ij s_ij (halved on a diagonal tile, where
    A holds both (i, j) and (j, i))."""
    s = acc * (rn_i * inv_tau)[:, None] * rn_j[None, :]
    lse_i, lpos_i, q_i, inv_i, w_i = _row_coefs(stats_ptr, w_ptr, rows_i, mask_i, M)
    lse_j, lpos_j, q_j, inv_j, w_j = _row_coefs(stats_ptr, w_ptr, rows_j, mask_j, M)
    valid = mask_i[:, None] & mask_j[None, :] & (rows_i[:, None] != rows_j[None, :])
    if LABELS:
        lab_i = tl.load(labels_ptr + rows_i, mask=mask_i, other=0)
        lab_j = tl.load(labels_ptr + rows_j, mask=mask_j, other=0)
        is_pos = valid & (lab_i[:, None] == lab_j[None, :])
    else:
        is_pos = valid & (rows_j[None, :] == ((rows_i + N) % M)[:, None])
    # Masked entries go through exp2 at -inf (=> 0), never at s_ii = 1/tau (which overflows).
    s2 = tl.where(valid, s * LOG2E_C, float("-inf"))
    c_ij = _coef(s2, is_pos, lse_i[:, None], lpos_i[:, None], q_i[:, None], inv_i[:, None], LABELS, MEAN)
    c_ji = _coef(s2, is_pos, lse_j[None, :], lpos_j[None, :], q_j[None, :], inv_j[None, :], LABELS, MEAN)
    # a row of weight 0 (no positive, or not a local row: its lse_pos may be -inf) adds nothing,
    # whatever its coefficient's arithmetic gave
    a = tl.where(valid, tl.where(w_i[:, None] != 0, w_i[:, None] * c_ij, 0.0)
                 + tl.where(w_j[None, :] != 0, w_j[None, :] * c_ji, 0.0), 0.0)
    tsum = tl.sum(tl.sum(a * tl.where(valid, s, 0.0), axis=1), axis=0)
    return a, tl.where(bi == bj, 0.5 * tsum, tsum)


@triton.jit
def _operand_rn(rn, dtype: tl.constexpr):
    """1 / norm as the backward's coefficient operands take it. float16 holds no nonzero row of
    norm <= eps (its smallest subnormal is 6e-8): a row whose norm was clamped (1 / norm = 1e12)
    is zero, its products are 0 whatever its coefficient, and that coefficient (a / eps) must not
    set _scaled_cast's power of two -- it made it ~2^-37 and flushed every other float16
    coefficient to 0 (all gradients 0). bfloat16 has float32's range."""
    if dtype == tl.float16:
        rn = tl.where(rn > 1e11, 0.0, rn)
    return rn


@triton.jit
def _scaled_cast(x, dtype: tl.constexpr):
    """x rescaled by a power of two c to a largest entry of ~1, cast to dtype; and c. The A
    tiles (~w * P, often ~1e-6) would otherwise be flushed to subnormals by fp16; the fp32
    product is divided by c again."""
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    c = tl.where(amax > 0, tl.exp2(-tl.ceil(tl.log2(tl.maximum(amax, 1e-30)))), 1.0)
    return (x * c).to(dtype), c


@triton.jit
def _nt_xent_bwd_rows_kernel(z1_ptr, z2_ptr, labels_ptr, norm_ptr, temp_ptr, stats_ptr, w_ptr,
                             g_ptr, tpart_ptr, N, M, D, stride1, stride2, LO, COUNT,
                             LABELS: tl.constexpr,
                             MEAN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr):
    """Backward for D <= BLOCK_D (the whole feature dimension in registers). Program I walks the
    tiles J >= I of its block row: its own rows' gradient G_I += A_IJ u_J stays in registers
    (one atomic add at the end), the other side's G_J += A_IJ^T u_I is an fp32 atomic add.
    Each row of z is loaded once per tile; tiles that meet no local row are skipped. Programs
    are numbered longest-first."""
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
    total = tl.zeros((), dtype=tl.float32)
    meets_i = _meets(bi, BLOCK, LO, COUNT, N, LABELS)
    for bj in range(bi, nb):
        if meets_i | _meets(bj, BLOCK, LO, COUNT, N, LABELS):
            rows_j = bj * BLOCK + tl.arange(0, BLOCK)
            mask_j = rows_j < M
            rn_j = 1.0 / tl.load(norm_ptr + rows_j, mask=mask_j, other=1.0)
            z_j = _load_rows(z1_ptr, z2_ptr, rows_j, mask_j, offs_d, N, D, stride1, stride2)
            acc = tl.dot(z_i, tl.trans(z_j), input_precision=PRECISION)
            a, tsum = _bwd_a_tile(acc, bi, bj, rows_i, mask_i, rows_j, mask_j, rn_i, rn_j, inv_tau,
                                  stats_ptr, w_ptr, labels_ptr, N, M, LABELS, MEAN)
            if bj != bi:
                a_i, c_i = _scaled_cast(tl.trans(a * _operand_rn(rn_i, z1_ptr.dtype.element_ty)[:, None]),
                                        z1_ptr.dtype.element_ty)
                g_j = tl.dot(a_i, z_i, input_precision=PRECISION) / c_i
                tl.atomic_add(g_ptr + row_offset(rows_j, D)[:, None] + offs_d[None, :], g_j,
                              mask=mask_j[:, None] & d_mask)
            total += tsum
            a_j, c_j = _scaled_cast(a * _operand_rn(rn_j, z1_ptr.dtype.element_ty)[None, :],
                                    z1_ptr.dtype.element_ty)
            g_i += tl.dot(a_j, z_j, input_precision=PRECISION) / c_j
    tl.atomic_add(g_ptr + row_offset(rows_i, D)[:, None] + offs_d[None, :], g_i,
                  mask=mask_i[:, None] & d_mask)
    tl.store(tpart_ptr + bi, total)


@triton.jit
def _nt_xent_bwd_pairs_kernel(z1_ptr, z2_ptr, labels_ptr, norm_ptr, temp_ptr, stats_ptr, w_ptr,
                              g_ptr, tpart_ptr, N, M, D, stride1, stride2, LO, COUNT,
                              LABELS: tl.constexpr,
                              MEAN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                              PRECISION: tl.constexpr):
    """Backward for any D: one program per tile pair (I, J), I <= J, looping over D chunks;
    G_I += A u_J and (I < J) G_J += A^T u_I as fp32 atomic adds; sum A s to tpart[I, J]."""
    bi = tl.program_id(0)
    bj = tl.program_id(1)
    if bi > bj:
        return
    if not (_meets(bi, BLOCK, LO, COUNT, N, LABELS) | _meets(bj, BLOCK, LO, COUNT, N, LABELS)):
        return  # no local row: A = 0 (tpart stays 0)
    rows_i = bi * BLOCK + tl.arange(0, BLOCK)
    rows_j = bj * BLOCK + tl.arange(0, BLOCK)
    mask_i = rows_i < M
    mask_j = rows_j < M
    inv_tau = 1.0 / tl.load(temp_ptr).to(tl.float32)
    rn_i = 1.0 / tl.load(norm_ptr + rows_i, mask=mask_i, other=1.0)
    rn_j = 1.0 / tl.load(norm_ptr + rows_j, mask=mask_j, other=1.0)
    acc = _dot_tile(z1_ptr, z2_ptr, rows_i, mask_i, rows_j, mask_j, N, D, stride1, stride2,
                    BLOCK, BLOCK, BLOCK_D, PRECISION)
    a, tsum = _bwd_a_tile(acc, bi, bj, rows_i, mask_i, rows_j, mask_j, rn_i, rn_j, inv_tau,
                          stats_ptr, w_ptr, labels_ptr, N, M, LABELS, MEAN)
    tl.store(tpart_ptr + bi * tl.num_programs(1) + bj, tsum)
    a_j, c_j = _scaled_cast(a * _operand_rn(rn_j, z1_ptr.dtype.element_ty)[None, :], z1_ptr.dtype.element_ty)
    a_i, c_i = _scaled_cast(tl.trans(a * _operand_rn(rn_i, z1_ptr.dtype.element_ty)[:, None]),
                            z1_ptr.dtype.element_ty)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d[None, :] < D
        z_j = _load_rows(z1_ptr, z2_ptr, rows_j, mask_j, offs_d, N, D, stride1, stride2)
        g_i = tl.dot(a_j, z_j, input_precision=PRECISION) / c_j
        tl.atomic_add(g_ptr + row_offset(rows_i, D)[:, None] + offs_d[None, :], g_i,
                      mask=mask_i[:, None] & d_mask)
        if bi != bj:
            z_i = _load_rows(z1_ptr, z2_ptr, rows_i, mask_i, offs_d, N, D, stride1, stride2)
            g_j = tl.dot(a_i, z_i, input_precision=PRECISION) / c_i
            tl.atomic_add(g_ptr + row_offset(rows_j, D)[:, None] + offs_d[None, :], g_j,
                          mask=mask_j[:, None] & d_mask)


@triton.jit
def _finish_chunk(z1_ptr, z2_ptr, g_ptr, rows, row_mask, offs_d, rn_i, inv_tau, N, D, stride1,
                  stride2):
    """One feature chunk of u_i and grad_u_i = G_i / tau."""
    mask = row_mask[:, None] & (offs_d[None, :] < D)
    u_i = _load_rows(z1_ptr, z2_ptr, rows, row_mask, offs_d, N, D, stride1, stride2).to(tl.float32) * rn_i[:, None]
    g = tl.load(g_ptr + row_offset(rows, D)[:, None] + offs_d[None, :], mask=mask, other=0.0)
    return u_i, inv_tau * g, mask


@triton.jit
def _nt_xent_finish_kernel(z1_ptr, z2_ptr, norm_ptr, temp_ptr, g_ptr, gz1_ptr, gz2_ptr, N, M, D,
                           stride1, stride2, gstride1, gstride2, BLOCK_R: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """grad_z_i = (grad_u_i - (u_i . grad_u_i) u_i) / norm_i with grad_u = G / tau (or grad_u_i /
    eps where the norm was clamped, as F.normalize), in the input dtype."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    inv_tau = 1.0 / tl.load(temp_ptr).to(tl.float32)
    norm_i = tl.load(norm_ptr + rows, mask=row_mask, other=1.0)
    rn_i = 1.0 / norm_i
    dot_gu = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        u_i, gu, _ = _finish_chunk(z1_ptr, z2_ptr, g_ptr, rows, row_mask, k0 + tl.arange(0, BLOCK_D),
                                   rn_i, inv_tau, N, D, stride1, stride2)
        dot_gu += tl.sum(u_i * gu, axis=1)
    keep_radial = tl.where(norm_i <= NORM_EPS_C, 0.0, 1.0)
    for k0 in range(0, D, BLOCK_D):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        u_i, gu, mask = _finish_chunk(z1_ptr, z2_ptr, g_ptr, rows, row_mask, offs_d, rn_i, inv_tau,
                                      N, D, stride1, stride2)
        gz = ((gu - (keep_radial * dot_gu)[:, None] * u_i) * rn_i[:, None]).to(gz1_ptr.dtype.element_ty)
        tl.store(gz1_ptr + row_offset(rows, gstride1)[:, None] + offs_d[None, :], gz,
                 mask=mask & (rows < N)[:, None])
        tl.store(gz2_ptr + row_offset(rows - N, gstride2)[:, None] + offs_d[None, :], gz,
                 mask=mask & (rows >= N)[:, None])


# Up to this padded feature width the backward keeps a row block's gradient in registers.
ROWS_MAX_D = 256


def _config(m: int, d: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Launch configuration by shape (no autotuning: it would cost the first step dearly).

    Tile sizes are powers of two >= 16 (tl.dot's minimum). Under the interpreter, big tiles
    keep the numpy emulation fast. On a GPU: 64-row tiles, the feature dimension in chunks of
    up to 128; the register-resident backward takes the whole padded width at once.
    """
    d_pad = pow2_at_least(d)
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
    _fwd_tuned = triton.autotune(configs=_tuning_configs("fwd"), key=["N", "M", "D"])(_nt_xent_fwd_kernel)
    _bwd_rows_tuned = triton.autotune(configs=_tuning_configs("rows"), key=["N", "M", "D"],
                                      reset_to_zero=["g_ptr", "tpart_ptr"])(_nt_xent_bwd_rows_kernel)
    _bwd_pairs_tuned = triton.autotune(configs=_tuning_configs("pairs"), key=["N", "M", "D"],
                                       reset_to_zero=["g_ptr", "tpart_ptr"])(_nt_xent_bwd_pairs_kernel)


def _rows_and_labels(z1, z2, labels, temperature):
    """(z1, z2, labels or a stand-in, N = rows of z1, M = all rows) for the kernels, checked as the
    fake kernel checks them; without labels (paired mode) the kernels never read the stand-in."""
    check_rows(z1, z2, labels, temperature)
    z1, z2 = z1.contiguous(), second_view(z1, z2).contiguous()
    lab = z1 if labels is None else labels.to(torch.int64).contiguous()
    return z1, z2, lab, z1.shape[0], z1.shape[0] + z2.shape[0]


@triton_op("fastclr::nt_xent_triton_forward", mutates_args=())
def nt_xent_forward(z1: torch.Tensor, z2: Optional[torch.Tensor], temperature: torch.Tensor,
                    labels: Optional[torch.Tensor] = None, *, mean_positives: bool = False,
                    compute_accuracy: bool = False, row_lo: int = 0,
                    row_count: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_loss, stats, norm, rank) as fastclr::nt_xent_forward, by the Triton kernels."""
    z1, z2, lab, n, m = _rows_and_labels(z1, z2, labels, temperature)
    lo, count, span = local_rows(row_lo, row_count, n, m, labels is None)
    d = z1.shape[1]
    cfg = _config(m, d, z1.dtype, INTERPRETED)
    norm = torch.empty(m, device=z1.device, dtype=torch.float32)
    stats = torch.empty((4, m), device=z1.device, dtype=torch.float32)
    loss = torch.empty_like(norm)
    rank = torch.empty((2, m) if compute_accuracy else (0,), device=z1.device, dtype=torch.int32)
    if count < span:  # the other rows: no loss, no positive (weighed 0 by the backward)
        loss.zero_()
        # lse, lse_pos, Q, |P|: +inf logsumexps keep the backward's coefficients finite
        for row, value in enumerate((float("inf"), float("inf"), 1.0, 0.0)):
            stats[row].fill_(value)
        rank.zero_()
    launcher(_nt_xent_norm_kernel)[(triton.cdiv(m, 64),)](
        z1, z2, norm, n, m, d, z1.stride(0), z2.stride(0), BLOCK_R=64,
        BLOCK_D=min(128, pow2_at_least(d)))
    args = (z1, z2, lab, norm, temperature, loss, stats, rank, n, m, d, z1.stride(0), z2.stride(0),
            lo, count)
    flags = dict(LABELS=labels is not None, MEAN=bool(mean_positives), COMPUTE_RANK=compute_accuracy,
                 PRECISION=dot_precision(z1.dtype))
    # row blocks over the local rows: one range with labels; paired, one per view (never
    # straddling row N)
    parts = 1 if labels is not None else 2
    blocks = lambda bm: parts * triton.cdiv(count, bm)  # noqa: E731
    if count == 0:
        return loss, stats, norm, rank
    if AUTOTUNE:
        launcher(_fwd_tuned)[lambda meta: (blocks(meta["BLOCK_M"]),)](*args, **flags)
    else:
        launcher(_nt_xent_fwd_kernel)[(blocks(cfg["BLOCK_M"]),)](
            *args, **flags, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return loss, stats, norm, rank


@triton_op("fastclr::nt_xent_triton_backward", mutates_args=())
def nt_xent_backward(grad_rows: torch.Tensor, z1: torch.Tensor, z2: Optional[torch.Tensor],
                     temperature: torch.Tensor, norm: torch.Tensor, stats: torch.Tensor,
                     labels: Optional[torch.Tensor] = None, *, mean_positives: bool = False,
                     row_lo: int = 0, row_count: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_z1, grad_z2, grad_temperature) as fastclr::nt_xent_backward, by Triton."""
    z1, z2, lab, n, m = _rows_and_labels(z1, z2, labels, temperature)
    lo, count, _ = local_rows(row_lo, row_count, n, m, labels is None)
    d = z1.shape[1]
    w = grad_rows.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    cfg = _config(m, d, z1.dtype, INTERPRETED)
    g = torch.zeros(m, d, device=z1.device, dtype=torch.float32)
    # Sized for the smallest tile any configuration uses; unused entries stay 0.
    nb_max = triton.cdiv(m, 64 if AUTOTUNE else cfg["BLOCK_BWD"])
    tpart = torch.zeros(nb_max * nb_max, device=z1.device, dtype=torch.float32)
    args = (z1, z2, lab, norm, temperature, stats, w, g, tpart, n, m, d, z1.stride(0), z2.stride(0),
            lo, count)
    flags = dict(LABELS=labels is not None, MEAN=bool(mean_positives), PRECISION=dot_precision(z1.dtype))
    if cfg["ROWS_BWD"]:
        if AUTOTUNE:
            launcher(_bwd_rows_tuned)[lambda meta: (triton.cdiv(m, meta["BLOCK"]),)](
                *args, **flags, BLOCK_D=cfg["BLOCK_D_BWD"])
        else:
            launcher(_nt_xent_bwd_rows_kernel)[(triton.cdiv(m, cfg["BLOCK_BWD"]),)](
                *args, **flags, BLOCK=cfg["BLOCK_BWD"], BLOCK_D=cfg["BLOCK_D_BWD"],
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    elif AUTOTUNE:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK"]), triton.cdiv(m, meta["BLOCK"]))  # noqa: E731
        launcher(_bwd_pairs_tuned)[grid](*args, **flags)
    else:
        nb = triton.cdiv(m, cfg["BLOCK_BWD"])
        launcher(_nt_xent_bwd_pairs_kernel)[(nb, nb)](
            *args, **flags, BLOCK=cfg["BLOCK_BWD"], BLOCK_D=cfg["BLOCK_D_BWD"],
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    grad_z1 = torch.empty_like(z1)
    grad_z2 = torch.empty_like(z2)
    block_r = 32
    launcher(_nt_xent_finish_kernel)[(triton.cdiv(m, block_r),)](
        z1, z2, norm, temperature, g, grad_z1, grad_z2, n, m, d, z1.stride(0), z2.stride(0),
        grad_z1.stride(0), grad_z2.stride(0), BLOCK_R=block_r, BLOCK_D=min(64, pow2_at_least(d)))
    # dL/dtau = -(1/tau) * sum_i w_i sum_{j != i} c_ij s_ij
    grad_t = -tpart.sum() / temperature.to(torch.float32)
    return grad_z1, grad_z2, grad_t


_backward, _setup_context = autograd_formula(nt_xent_backward)
nt_xent_forward.register_autograd(_backward, setup_context=_setup_context)
