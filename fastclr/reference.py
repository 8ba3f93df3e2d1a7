"""The pure-PyTorch reference of NT-Xent, SupCon, normalized similarity and kNN: the executable
form of the math in docs/math.md.

Every kernel is tested against these functions (run in float64). They materialise the full
M x M similarity matrix, so they are the spec, not the fast path, and they share no computation
with the code they judge: from fastclr._numerics they take only definitions -- the norm's
epsilon, the accumulation dtype, and kNN's fixed-order float64 score, which *is* knn_topk's
ranking contract (the C++ kernel follows the same order).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastclr._numerics import NORM_EPS, accumulation_dtype, unit_dot64, unit_rows64

__all__ = ["NORM_EPS", "accumulation_dtype", "positive_index", "similarity_logits", "positive_rank",
           "nt_xent", "accuracy_from_rank", "supcon_logits", "supcon", "supcon_rank",
           "supcon_accuracy", "normalized_similarity", "knn_scores", "knn_topk"]


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
    loss = _reduce(rows, reduction)
    if not return_accuracy:
        return loss
    with torch.no_grad():
        return loss, accuracy_from_rank(positive_rank(s))


def accuracy_from_rank(rank: torch.Tensor) -> dict:
    """Accuracies (fractions in [0, 1], float32) from the (2, M) ranks of :func:`positive_rank`:
    ``top1`` / ``top5``, every row's positive against all 2N - 2 other rows (fewer than k score
    above it); ``contrast_acc``, google-research/simclr's metric: view 1's rows, the positive
    against the N cross-view candidates (the argmax of logits_ab is the positive)."""
    top1, top5 = (rank[0] < 1).float().mean(), (rank[0] < 5).float().mean()
    return {"top1": top1, "top5": top5, "contrast_acc": (rank[1, :rank.shape[1] // 2] < 1).float().mean()}


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    return {"mean": rows.mean, "sum": rows.sum, "none": lambda: rows}[reduction]()


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
        loss = _reduce(rows, reduction)
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
    has = count > 0
    n = has.sum().clamp_min(1).float()
    return {"top1": (has & (rank[0] < 1)).sum() / n, "top5": (has & (rank[0] < 5)).sum() / n}


def normalized_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) cosine similarities F.normalize(a) @ F.normalize(b).T, in the accumulation dtype."""
    acc = accumulation_dtype(a.dtype)
    return F.normalize(a.to(acc), dim=1, eps=NORM_EPS) @ F.normalize(b.to(acc), dim=1, eps=NORM_EPS).T


def knn_scores(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """The (M, K) float64 cosine similarities every knn_topk backend ranks by -- the one formula
    that decides the order: s_ij = sum_t (q_it / ||q_i||) (b_jt / ||b_j||), each row divided by
    its norm first (as F.normalize), the sum in ``fastclr._numerics.fixed_order_sum``'s order, on the inputs'
    exact values (half and float32 inputs are exactly representable in float64). Rows that
    normalise to the same vector (duplicates, scaled copies whose norms scale exactly, every row
    when D = 1) score identically. O(M K) memory: the spec, not the fast path."""
    return unit_dot64(unit_rows64(queries)[:, None, :], unit_rows64(bank)[None, :, :])


def knn_topk(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """The k bank rows with the highest ``knn_scores`` per query, best first, equal scores to the
    lower bank index, NaN ranked highest (a stable descending sort of the whole (M, K) matrix);
    values in the accumulation dtype (the float64 scores rounded once)."""
    values, indices = torch.sort(knn_scores(queries, bank), dim=1, descending=True, stable=True)
    return values[:, :k].to(accumulation_dtype(bank.dtype)), indices[:, :k]
