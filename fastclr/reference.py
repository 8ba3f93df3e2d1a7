"""The pure-PyTorch reference of NT-Xent: the executable form of the math in DESIGN.md.

Every kernel is tested against this function (run in float64). It materialises the full
M x M similarity matrix, so it is the spec, not the fast path.
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
    """#{j not in {i, p(i)} : s_ij > s_{i,p(i)}} per row (int32): top-k correct iff rank < k."""
    m = s.shape[0]
    p = positive_index(m, s.device)
    pos = s[torch.arange(m, device=s.device), p]
    others = s.masked_fill(F.one_hot(p, m).bool(), float("-inf"))
    return (others > pos[:, None]).sum(1, dtype=torch.int32)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature=0.5, reduction: str = "mean",
            return_accuracy: bool = False):
    """NT-Xent of DESIGN.md: loss_i = logsumexp_{j != i} s_ij - s_{i,p(i)}.

    Same conventions as :func:`fastclr.nt_xent_fused` (but no input checks): the loss is in
    float32 for half inputs, in the input dtype otherwise; ``reduction`` is ``"mean"``,
    ``"sum"`` or ``"none"`` (the 2N per-row losses).
    """
    s = similarity_logits(z1, z2, temperature)
    m = s.shape[0]
    pos = s[torch.arange(m, device=s.device), positive_index(m, s.device)]
    rows = torch.logsumexp(s, dim=1) - pos
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
    """Contrastive top-1 / top-5 accuracy (fractions in [0, 1], float32) from per-row ranks."""
    return {"top1": (rank < 1).float().mean(), "top5": (rank < 5).float().mean()}


def normalized_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) cosine similarities F.normalize(a) @ F.normalize(b).T, in the accumulation dtype."""
    acc = accumulation_dtype(a.dtype)
    return F.normalize(a.to(acc), dim=1, eps=NORM_EPS) @ F.normalize(b.to(acc), dim=1, eps=NORM_EPS).T


def knn_topk(queries: torch.Tensor, bank: torch.Tensor, k: int):
    """The k largest similarities per query and their bank indices, best first, ties to the lower
    index: a stable descending sort of the whole (M, K) matrix. Bank rows that normalise to the
    same vector (duplicates, scaled copies whose norms scale exactly, every row when D = 1) are
    scored once -- a matrix product may round them differently by position --, so they tie
    exactly."""
    acc = accumulation_dtype(bank.dtype)
    unique, inverse = torch.unique(F.normalize(bank.to(acc), dim=1, eps=NORM_EPS), dim=0,
                                   return_inverse=True)
    s = normalized_similarity(queries, unique)[:, inverse]
    values, indices = torch.sort(s, dim=1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]
