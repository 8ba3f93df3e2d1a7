"""Numerics the library's ops share (private: the reference, fastclr/reference.py, is the spec
they are tested against and takes only the definitions below from here).

Definitions: ``NORM_EPS`` and ``accumulation_dtype`` (what every backend and the reference
compute in), and kNN's score formula -- ``unit_rows64`` / ``unit_dot64``, one fixed-order float64
sum that csrc/similarity_cpu.cpp follows too: the ranking contract of ``knn_topk`` *is* this
formula, so the reference and the streamed re-scoring both use it, bit for bit. Helpers of the
ops: reductions of per-row losses, accuracy counts that add up over ranks, the kNN tie rule.
"""
from __future__ import annotations

import torch

NORM_EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bfloat16, float16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --- per-row losses and accuracy counts ----------------------------------------------------

def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def pair_hits(rank: torch.Tensor, mine: torch.Tensor | None = None) -> torch.Tensor:
    """float32 counts (top-1 hits, top-5 hits, contrast_acc hits, rows, view-1 rows) over the rows
    ``mine`` ((M,) mask; all by default) of the (2, M) ranks: counts add up over ranks."""
    m = rank.shape[1]
    i = torch.arange(m, device=rank.device)
    mine = torch.ones(m, dtype=torch.bool, device=rank.device) if mine is None else mine
    view1 = mine & (i < m // 2)
    return torch.stack([(mine & (rank[0] < 1)).sum(), (mine & (rank[0] < 5)).sum(),
                        (view1 & (rank[1] < 1)).sum(), mine.sum(), view1.sum()]).float()


def accuracy_from_hits(hits: torch.Tensor) -> dict:
    """The accuracies of :func:`accuracy_from_rank` from :func:`pair_hits`' counts."""
    return {"top1": hits[0] / hits[3], "top5": hits[1] / hits[3], "contrast_acc": hits[2] / hits[4]}


def supcon_hits(rank: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """float32 counts (rows with a positive, top-1 hits, top-5 hits): counts add up over ranks."""
    has = count > 0
    return torch.stack([has.sum(), (has & (rank[0] < 1)).sum(), (has & (rank[0] < 5)).sum()]).float()


def supcon_accuracy_from_hits(hits: torch.Tensor) -> dict:
    n = hits[0].clamp_min(1)
    return {"top1": hits[1] / n, "top5": hits[2] / n}


# --- kNN's score formula and tie rule -----------------------------------------------------

def fixed_order_sum(d: int, term) -> torch.Tensor:
    """sum_t term(t) over t < d in float64 in one fixed order -- four running sums (t mod 4 for
    the first 4 floor(d / 4) terms, the rest into the first), then (s0 + s1) + (s2 + s3) -- with
    one rounding per multiply and per add (elementwise tensor ops, no fused multiply-add): the
    order csrc/similarity_cpu.cpp's fixed_order_sum uses, so both round alike, bit for bit."""
    first = term(0)
    acc = [torch.zeros_like(first) for _ in range(4)]
    acc[0] = acc[0] + first  # from 0, as the C++ (so -0.0 becomes +0.0 there too)
    t = 1
    while t < d - d % 4:
        acc[t % 4] = acc[t % 4] + term(t)
        t += 1
    while t < d:
        acc[0] = acc[0] + term(t)
        t += 1
    return (acc[0] + acc[1]) + (acc[2] + acc[3])


def sqrt64(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded float64 square root (IEEE's, as std::sqrt and CUDA's). torch's
    vectorised CPU kernel is not: on an AVX-512 Xeon it gave sqrt(19) one ulp below it, so on
    the CPU numpy's (the sqrtpd instruction) computes it, or without numpy Python's."""
    if x.device.type != "cpu":
        return x.sqrt()
    try:
        import numpy as np
    except ImportError:  # fastclr needs torch alone: then Python's, one element at a time
        import math
        return torch.tensor([math.sqrt(v) for v in x.tolist()], dtype=torch.float64)
    return torch.from_numpy(np.sqrt(x.contiguous().numpy()))


def unit_rows64(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` in float64 divided by max(||row||, 1e-12), the norm a fixed-order sum
    (``fixed_order_sum``); a NaN norm is replaced by 1e-12 as the C++ does (the row stays NaN)."""
    x = x.double()
    norm = sqrt64(fixed_order_sum(x.shape[1], lambda t: x[:, t] * x[:, t]))
    norm = torch.where(norm > NORM_EPS, norm, torch.full_like(norm, NORM_EPS))
    return x / norm[:, None]


def unit_dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_t a[..., t] b[..., t] of float64 unit rows (``unit_rows64``), broadcast over the
    leading dimensions, in ``fixed_order_sum``'s order: the score of knn_scores and of the
    streamed paths' re-scoring (fastclr.similarity._rescore)."""
    return fixed_order_sum(a.shape[-1], lambda t: a[..., t] * b[..., t])


def rank_by_score(scores: torch.Tensor, candidates: torch.Tensor | None, k: int):
    """(best k scores, their bank rows) of float64 ``scores`` (M, C) of the bank rows
    ``candidates`` (M, C; None: columns 0..C-1): descending, NaN ranked highest (as torch.sort),
    equal scores to the lower bank row -- the tie rule of knn_topk."""
    if candidates is not None:  # bank-row order first, so the stable sort breaks ties by row
        candidates, order = torch.sort(candidates, dim=1)
        scores = scores.gather(1, order)
    values, order = torch.sort(scores, dim=1, descending=True, stable=True)
    rows = order if candidates is None else candidates.gather(1, order)
    return values[:, :k], rows[:, :k]
