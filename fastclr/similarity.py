"""Normalized similarity and streaming top-k cosine search (the kNN monitor's kernels).

``normalized_similarity(a, b)`` is the (M, K) cosine-similarity matrix with the normalisation
fused into the product. ``knn_topk(queries, bank, k)`` returns the exact k most similar bank rows
of each query without ever holding the M x K matrix: it streams over bank tiles, screens them in
a cheap precision with a proven error bound and re-scores the few possible winners in float64;
memory O((M + K) D + M k) plus one tile.
"""
from __future__ import annotations

import numbers

import torch

from fastclr import _dispatch, _numerics, reference
from fastclr._dispatch import check_row_pair

IMPLS = _dispatch.OPS["normalized_similarity"].impls
DEFAULT_CHUNK = 4096


def normalized_similarity(a: torch.Tensor, b: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Cosine similarities s_ij = a_i . b_j / (max(||a_i||, 1e-12) max(||b_j||, 1e-12)).

    Args:
        a: (M, D), b: (K, D); same dtype (float32, bfloat16, float16; float64 on CPU) and device.
        impl: "auto" (fastclr._dispatch's rule: the C++ kernel on CPU; on CUDA Triton or the
            CUDA kernel, by the measured table) | "reference" | "cpu" | "triton" | "cuda" (the
            hand-written CUDA kernel, kernels/similarity.cu).

    Returns:
        (M, K), float32 for half inputs (float32 accumulation), the input dtype otherwise.
        Differentiable in a and b (through the normalisation, F.normalize semantics).
    """
    check_row_pair("normalized_similarity", ("a", "b"), a, b, same_shape=False)
    kernel = _dispatch.resolve("normalized_similarity", impl, a.device, a.dtype).kernel
    return reference.normalized_similarity(a, b) if kernel is None else kernel(a, b)


def knn_topk(queries: torch.Tensor, bank: torch.Tensor, k: int, *, impl: str = "auto",
             chunk: int | None = None):
    """The ``k`` bank rows most cosine-similar to each query, exactly.

    Streams over tiles of ``chunk`` bank rows (default 4096): extra memory O(M k + tile) plus a
    reduced-precision copy of the inputs on CPU, never the (M, K) matrix. The product runs in a
    cheap precision (CPU: bfloat16 where the CPU has bf16 dot instructions, else float32; GPU:
    float32 tiles from Triton or, with ``impl="cuda"``, kernels/similarity.cu); a proven bound on
    its error picks the rows that could still be among the k best, and only those are re-scored
    in float64. The result equals the float64 reference's (a stable sort of the full matrix):
    same values, same indices, ties to the lower bank index. ``k`` must be between 1 and the
    number of bank rows (``k == K`` sorts the whole bank). Not differentiable (use
    ``normalized_similarity`` for gradients).

    Returns:
        ``(values, indices)``: (M, k) similarities, best first (float32 for half inputs), and
        (M, k) int64 bank row indices.
    """
    check_row_pair("knn_topk", ("queries", "bank"), queries, bank, same_shape=False)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"knn_topk: k must be an int, got {type(k).__name__} {k!r}")
    k = int(k)  # numpy / other integral types
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"knn_topk: k must be between 1 and the number of bank rows "
                         f"({bank.shape[0]}), got k={k}")
    chunk = DEFAULT_CHUNK if chunk is None else chunk
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
        raise ValueError(f"knn_topk: chunk must be a positive int, got {chunk!r}")
    chunk = int(chunk)
    backend = _dispatch.resolve("knn_topk", impl, queries.device, queries.dtype)
    with torch.no_grad():
        if backend.kernel is None:
            return reference.knn_topk(queries, bank, k)
        if backend.name == "cpu":  # the C++ streaming top-k
            return backend.kernel(queries, bank, k=k, chunk=chunk)
        # on a GPU (or the CUDA kernels' CPU harness): top-k streamed over the similarity kernel
        return _streamed_topk(queries, bank, k, chunk, backend.kernel)


EXTRA_CANDIDATES = 32  # kept beyond k by the first streaming pass


def _screen_margin(dim: int) -> float:
    """A bound on |GPU score - exact score| for unit rows (Triton and CUDA kernels alike): float32
    accumulation over D terms, the 3xTF32 split products (~2^-22 relative; half inputs multiply
    exactly) and the float32 inverse norms, padded 4x."""
    return 4.0 * (dim + 8) * 2.0 ** -22


def _streamed_topk(queries, bank, k, chunk, sim, query_block: int = 1024):
    """Per block of queries: a running top-kk (kk = k + 32) over bank tiles of ``sim`` (the
    Triton or the CUDA similarity op: float32 scores, the same error bound) -- a stable descending sort of [running candidates, new tile], ties kept at the
    lower index --, then the candidates re-scored in float64 and the best k kept (``_rescore``).

    Exact, not heuristic: with delta the screen's error bound, a dropped row scored at most the
    kk-th kept value v; when v < t - 2 delta (t: the k-th best screened value) a dropped row is
    exactly below t - delta, under k rows that are exactly >= t - delta, so it cannot be in the
    top k. Queries whose band of near-ties is wider than that are searched again with kk doubled
    (kk = K keeps everything), so the result always equals the float64 reference's."""
    n_bank = bank.shape[0]
    delta = _screen_margin(queries.shape[1])
    out_v = torch.empty(queries.shape[0], k, device=queries.device,
                        dtype=_numerics.accumulation_dtype(queries.dtype))
    out_i = torch.empty(queries.shape[0], k, device=queries.device, dtype=torch.long)
    for b0 in range(0, queries.shape[0], query_block):
        todo = torch.arange(b0, min(b0 + query_block, queries.shape[0]), device=queries.device)
        kk = min(k + EXTRA_CANDIDATES, n_bank)
        while todo.numel():
            best_v, best_i = _running_topk(queries[todo], bank, kk, chunk, sim)
            certified = best_v[:, kk - 1] < best_v[:, k - 1] - 2 * delta  # NaN: not certified
            if kk == n_bank:
                certified[:] = True
            done = todo[certified]
            v, i = _rescore(queries[done], bank, best_i[certified], k)
            out_v[done], out_i[done] = v.to(out_v.dtype), i
            todo, kk = todo[~certified], min(2 * kk, n_bank)
    return out_v, out_i


def _running_topk(q, bank, kk, chunk, sim):
    """The kk best screened (float32) scores of each query and their bank rows."""
    best_v = q.new_empty((q.shape[0], 0), dtype=torch.float32)
    best_i = torch.empty((q.shape[0], 0), dtype=torch.long, device=q.device)
    for j0 in range(0, bank.shape[0], chunk):
        s = sim(q, bank[j0:j0 + chunk])
        idx = torch.arange(j0, j0 + s.shape[1], device=q.device).expand(q.shape[0], -1)
        v, order = torch.sort(torch.cat([best_v, s], dim=1), dim=1, descending=True, stable=True)
        best_v, best_i = v[:, :kk], torch.cat([best_i, idx], dim=1).gather(1, order[:, :kk])
    return best_v, best_i


def _rescore(q, bank, cand, k):
    """The candidates' exact scores (reference.knn_scores' formula, the one every backend ranks
    by) and the best k, ties to the lower bank row."""
    qn = _numerics.unit_rows64(q)                                  # (mq, D)
    rows = _numerics.unit_rows64(bank[cand.reshape(-1)]).view(*cand.shape, q.shape[1])  # (mq, kk, D)
    return _numerics.rank_by_score(_numerics.unit_dot64(qn[:, None, :], rows), cand, k)
