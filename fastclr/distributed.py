"""Gathering embeddings across processes with gradients that match single-process training.

With ``W`` processes of ``N`` rows each, the loss must see the global batch of ``W N`` pairs. Each
rank gathers every rank's rows (``all_gather_with_grad``) and computes the loss of its own rows
only, against every gathered row (the fused kernels' local-rows mode: 1/W of the forward's work),
``L_r`` their mean; the mean of ``L_r`` over ranks is the single-process loss ``L``. Its backward
yields a gradient for all ``W N`` gathered rows -- its rows' own terms, and every row's terms as a
column of its rows -- and the gather's backward sums those over ranks with one reduce-scatter, so
rank ``r``'s rows get ``sum_r' dL_r'/dz_r = W dL/dz_r`` and DDP's averaging of parameter gradients
over the ``W`` ranks yields exactly ``dL/dtheta``.

Two known mistakes this avoids: a gather whose backward drops the other ranks' gradient terms
(no all-reduce: each rank's rows then miss their role as negatives elsewhere), and one that both
all-reduces and lets every rank compute the whole global mean (parameter gradients W times too
large).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # the sum over ranks of each rank's slice, in one collective: half the bytes an
        # all-reduce followed by slicing would move
        out = grad.new_empty((ctx.rows, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """``cat`` of every rank's ``x`` (same shape on all ranks) along dim 0, differentiable: the
    backward reduce-scatters (sums over ranks) the gradient, each rank getting its own slice."""
    if not is_distributed(group):
        return x
    _check_same_shape(tuple(x.shape), group)
    return _AllGather.apply(x, group)


_CHECKED_SHAPES: set = set()


def _check_same_shape(shape: tuple, group) -> None:
    """Every rank passes ``shape``: checked (one small all_gather on the host, a synchronisation)
    the first time a shape is seen in a group, then remembered, so a training loop's steady
    state makes no host synchronisation here."""
    key = (id(group), shape)
    if key in _CHECKED_SHAPES:
        return
    shapes = [None] * dist.get_world_size(group)
    dist.all_gather_object(shapes, shape, group=group)
    if any(s != shape for s in shapes):
        raise ValueError(f"all_gather_with_grad: every rank must pass the same shape, got {shapes}")
    _CHECKED_SHAPES.add(key)


def local_rows(rows: torch.Tensor, n: int, group=None) -> torch.Tensor:
    """The loss rows of this rank's pairs out of the ``2 W n`` rows of the gathered batch
    ``[z1 of all ranks; z2 of all ranks]``."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    lo = rank * n
    return torch.cat([rows[lo:lo + n], rows[world * n + lo:world * n + lo + n]])
