"""The pure-PyTorch reference of NT-Xent and SupCon: the executable form of the math in docs/math.md.

Every kernel is tested against these functions (run in float64). They materialise the full
M x M similarity matrix, so they are the spec, not the fast path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (float32, bfloat16, float16) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def positive_index(m: int, device=None) -> torch.Tensor:
    """p(i) = (i + N) mod M: row i of z1 pairs with row i of z2."""
    return (torch.arange(m, device=device) + m // 2) % m


def similarity_logits(z1: torch.Tensor, z2: torch.Tensor, temperature) -> torch.Tensor:
    """s_ij = u_i . u_j / tau over z = [z1; z2], with the diagonal set to -inf."""
    z = torch.cat([z1, z2]).to(accumulation_dtype(z1.dtype))
    u = F.normalize(z, dim=1, eps=NORM_EPS)
    s = (u @ u.T) / temperature
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    return s.masked_fill(eye, float("-inf"))


def positive_rank(s: torch.Tensor) -> torch.Tensor:
    """(2, M) int32: row 0, #{j not in {i, p(i)} : s_ij > s_{i,p(i)}} (top-k correct iff rank < k);
    row 1, the same count over the other view's rows alone (the cross-view logits_ab of
    google-research/simclr, whose contrast_acc is rank < 1 on view 1's rows)."""
    m = s.shape[0]
    p = positive_index(m, s.device)
    pos = s[torch.arange(m, device=s.device), p]
    above = s.masked_fill(F.one_hot(p, m).bool(), float("-inf")) > pos[:, None]
    view = torch.arange(m, device=s.device) >= m // 2
    cross = view[:, None] != view[None, :]
    return torch.stack([above.sum(1, dtype=torch.int32), (above & cross).sum(1, dtype=torch.int32)])


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature=0.5, reduction: str = "mean",
            return_accuracy: bool = False):
    """NT-Xent of docs/math.md: loss_i = logsumexp_{j != i} s_ij - s_{i,p(i)}.

    Same conventions as :func:`fastclr.nt_xent_fused` (but no input checks): the loss is in
    float32 for half inputs, in the input dtype otherwise; ``reduction`` is ``"mean"``,
    ``"sum"`` or ``"none"`` (the 2N per-row losses).
    """
    s = similarity_logits(z1, z2, temperature)
    m = s.shape[0]
    p = positive_index(m, s.device)
    pos = s[torch.arange(m, device=s.device), p]
    # The same loss as logsumexp_{j != i} s_ij - s_ip, written log(1 + sum_neg exp(s_ij - s_ip))
    # over the negatives alone: its gradient then carries the positive's weight 1 - P_ip as the
    # negatives' mass, which stays accurate when P_ip ~ 1 (1 - P would cancel). Self and positive
    # are filled with the dtype's lowest finite value, not -inf, so that N = 1 (no negative at
    # all) gives a loss of 0 with zero gradients rather than NaN.
    excluded = torch.eye(m, dtype=torch.bool, device=s.device) | F.one_hot(p, m).bool()
    neg = s.masked_fill(excluded, torch.finfo(s.dtype).min)
    rows = torch.logaddexp(torch.zeros_like(pos), torch.logsumexp(neg, dim=1) - pos)
    loss = reduce_rows(rows, reduction)
    if not return_accuracy:
        return loss
    with torch.no_grad():
        return loss, accuracy_from_rank(positive_rank(s))


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def accuracy_from_rank(rank: torch.Tensor) -> dict:
    """Accuracies (fractions in [0, 1], float32) from the (2, M) ranks of :func:`positive_rank`:
    ``top1`` / ``top5``, every row's positive against all 2N - 2 other rows (fewer than k score
    above it); ``contrast_acc``, google-research/simclr's metric: view 1's rows, the positive
    against the N cross-view candidates (the argmax of logits_ab is the positive)."""
    return accuracy_from_hits(pair_hits(rank))


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


POSITIVES = ("mean", "sum")


def supcon_logits(z: torch.Tensor, labels: torch.Tensor, temperature):
    """(s, same, eye): the logits s_ij = u_i . u_j / tau of the rows of z, the positive mask
    same_ij = (labels_i == labels_j) and i != j, and the diagonal."""
    u = F.normalize(z.to(accumulation_dtype(z.dtype)), dim=1, eps=NORM_EPS)
    s = (u @ u.T) / temperature
    eye = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    return s, (labels[:, None] == labels[None, :]) & ~eye, eye


def supcon(z: torch.Tensor, labels: torch.Tensor, temperature=0.1, positives: str = "mean",
           reduction: str = "mean", return_accuracy: bool = False):
    """Supervised contrastive loss of docs/math.md (the family of NT-Xent): positives of row i are
    P(i) = {j != i : labels_j = labels_i}; the denominator runs over every j != i.

    positives="mean" (SupCon's L_out): loss_i = logsumexp_{j != i} s_ij - mean_{p in P(i)} s_ip.
    positives="sum" (L_in): loss_i = logsumexp_{j != i} s_ij - logsumexp_{p in P(i)} s_ip.

    A row without a positive contributes nothing: 0 in "none", left out of "mean"'s count (a
    batch without any positive gives a loss of 0 with zero gradients). Written with the
    negatives' and the positives' logsumexps apart, x_i = lse_neg - lse_pos, so that the loss is
    log(1 + e^x) [+ lse_pos - mean_pos] -- the forms the kernels compute, free of cancellation.
    Accuracy: row i is top-k correct when fewer than k negatives score above its best positive
    (rows without a positive left out).
    """
    s, same, eye = supcon_logits(z, labels, temperature)
    # masked with the lowest finite value, not -inf: a row with nothing in a set stays finite
    # (no NaN gradients), and its logsumexp is ~ -3e38, which the softplus turns into 0
    low = torch.finfo(s.dtype).min
    neg = s.masked_fill(same | eye, low)
    pos = s.masked_fill(~same, low)
    count = same.sum(1)
    has = count > 0
    lse_pos = torch.logsumexp(pos, dim=1)
    rows = torch.logaddexp(torch.zeros_like(lse_pos), torch.logsumexp(neg, dim=1) - lse_pos)
    if positives == "mean":
        rows = rows + lse_pos - torch.where(same, s, 0).sum(1) / count.clamp_min(1)
    rows = torch.where(has, rows, 0)
    if reduction == "mean":
        loss = rows.sum() / has.sum().clamp_min(1)
    else:
        loss = reduce_rows(rows, reduction)
    if not return_accuracy:
        return loss
    return loss, supcon_accuracy(_rank_from_logits(s, same, eye), count)


def supcon_rank(z: torch.Tensor, labels: torch.Tensor, temperature) -> torch.Tensor:
    """(2, M) int32: #negatives scoring above row i's best positive, twice (the kernels' rank
    layout; the second row is NT-Xent's cross-view count there)."""
    return _rank_from_logits(*supcon_logits(z, labels, temperature))


def _rank_from_logits(s, same, eye) -> torch.Tensor:
    with torch.no_grad():
        best = s.masked_fill(~same, float("-inf")).amax(dim=1, keepdim=True)
        rank = ((s > best) & ~(same | eye)).sum(1, dtype=torch.int32)
        return torch.stack([rank, rank])


def supcon_accuracy(rank: torch.Tensor, count: torch.Tensor) -> dict:
    """``top1`` / ``top5`` (float32 fractions) over the rows that have a positive, from the
    (2, M) ranks (negatives above the best positive) and the positives' counts; 0 if none has."""
    return supcon_accuracy_from_hits(supcon_hits(rank, count))


def supcon_hits(rank: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """float32 counts (rows with a positive, top-1 hits, top-5 hits): counts add up over ranks."""
    has = count > 0
    return torch.stack([has.sum(), (has & (rank[0] < 1)).sum(), (has & (rank[0] < 5)).sum()]).float()


def supcon_accuracy_from_hits(hits: torch.Tensor) -> dict:
    n = hits[0].clamp_min(1)
    return {"top1": hits[1] / n, "top5": hits[2] / n}


def normalized_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) cosine similarities F.normalize(a) @ F.normalize(b).T, in the accumulation dtype."""
    acc = accumulation_dtype(a.dtype)
    return F.normalize(a.to(acc), dim=1, eps=NORM_EPS) @ F.normalize(b.to(acc), dim=1, eps=NORM_EPS).T


def _fixed_order_sum(d: int, term) -> torch.Tensor:
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


def _sqrt(x: torch.Tensor) -> torch.Tensor:
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
    (``_fixed_order_sum``); a NaN norm is replaced by 1e-12 as the C++ does (the row stays NaN)."""
    x = x.double()
    norm = _sqrt(_fixed_order_sum(x.shape[1], lambda t: x[:, t] * x[:, t]))
    norm = torch.where(norm > NORM_EPS, norm, torch.full_like(norm, NORM_EPS))
    return x / norm[:, None]


def unit_dot64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_t a[..., t] b[..., t] of float64 unit rows (``unit_rows64``), broadcast over the
    leading dimensions, in ``_fixed_order_sum``'s order: the score of knn_scores and of the
    streamed paths' re-scoring (fastclr.similarity._rescore)."""
    return _fixed_order_sum(a.shape[-1], lambda t: a[..., t] * b[..., t])


def knn_scores(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The (M, K) float64 cosine similarities every knn_topk backend ranks by -- the one formula
    that decides the order: s_ij = sum_t (q_it / ||q_i||) (b_jt / ||b_j||), each row divided by
    its norm first (as F.normalize), the sum in ``_fixed_order_sum``'s order, on the inputs'
    exact values (half and float32 inputs are exactly representable in float64). Rows that
    normalise to the same vector (duplicates, scaled copies whose norms scale exactly, every row
    when D = 1) score identically. O(M K) memory: the spec, not the fast path."""
    return unit_dot64(unit_rows64(queries)[:, None, :], unit_rows64(bank)[None, :, :])


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


def knn_topk(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """The k bank rows with the highest ``knn_scores`` per query, best first, equal scores to the
    lower bank index, NaN ranked highest (a stable descending sort of the whole (M, K) matrix);
    values in the accumulation dtype (the float64 scores rounded once)."""
    values, indices = rank_by_score(knn_scores(queries, bank), None, k)
    return values.to(accumulation_dtype(bank.dtype)), indices
