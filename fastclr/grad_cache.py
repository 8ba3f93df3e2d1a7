"""Exact gradient caching: a contrastive batch larger than the encoder's activations fit.

A contrastive loss is not a sum over samples, so plain gradient accumulation over micro-batches
computes a different (smaller-batch) loss. Gradient caching (Gao et al. 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup") gets the whole batch's gradient in
three passes: embed every micro-batch without autograd; compute the loss and its gradient with
respect to the embeddings on the whole batch; re-run each micro-batch with autograd and
back-propagate its slice of that gradient. The parameters' gradients are those of the
full-batch backward; memory is one micro-batch's activations plus the batch's embeddings
(O(M x D)), and the cost is one extra forward.

    loss = fastclr.grad_cache_backward(model, (view1, view2), loss_fn, micro_batch=256)

BatchNorm: each micro-batch is normalised by its own statistics (in both passes, so the two
agree), as DDP without SyncBatchNorm normalises each device's batch; the result equals training
with that per-forward batch, not with the whole batch's statistics. A model without BatchNorm
(GroupNorm, LayerNorm) gets exactly the full-batch gradients.
"""
from __future__ import annotations

import contextlib
import numbers

import torch


def grad_cache_backward(model, inputs, loss_fn, micro_batch):
    """Accumulates into the parameters' ``.grad`` what ``loss_fn(model(inputs)).backward()``
    would, forwarding at most ``micro_batch`` images at a time; returns the detached loss (and
    ``loss_fn``'s extras, when it returns ``(loss, extras)``).

    model: maps a micro-batch to its embeddings, or to a tuple whose last element is them (a
        module, a DDP module or its ``torch.compile``). ``no_sync`` is used when it has one: the
        gradients are all-reduced once, on the last micro-batch.
    inputs: a tensor of N images, or a tuple of V such tensors (the views). With views, the model
        sees ``torch.cat`` of the micro-batch's slice of every view (both views of the same
        images together, as ``model(torch.cat(views))`` sees the whole batch), and ``loss_fn``
        gets the embeddings in that order: view 0's N rows, then view 1's, ...
    loss_fn: maps the whole batch's embeddings (V x N rows) to a scalar loss, or to
        ``(loss, extras)``. Its own parameters (a learnable temperature) get their gradients too.
    micro_batch: images per forward (a positive int; N or more: one ordinary forward and backward).

    The second forward of a micro-batch sees the random state (CPU and CUDA) of its first, so
    dropout and stochastic depth draw the same masks in both; the random state afterwards is the
    first pass's. BatchNorm running statistics are updated once per micro-batch (first pass).
    Run it under ``torch.autocast`` to embed in bf16: both passes see the same autocast state.
    """
    views = _as_views(inputs)
    n = views[0].shape[0]
    micro_batch = _check_micro_batch(micro_batch)
    if micro_batch >= n:  # one micro-batch: the ordinary backward, one forward
        out = loss_fn(_embeddings(model(_slice(views, 0, n)), len(views) * n))
        loss, extras = _split_loss(out)
        _backward(loss)
        return _result(loss, extras)
    bounds = [(s, min(s + micro_batch, n)) for s in range(0, n, micro_batch)]
    states, pieces = _first_pass(model, views, bounds)
    z = _assemble(pieces, len(views)).detach().requires_grad_(True)
    del pieces
    out = loss_fn(z)
    loss, extras = _split_loss(out)
    _backward(loss)
    if z.grad is None:
        raise RuntimeError("grad_cache_backward: the loss does not depend on the embeddings")
    _second_pass(model, views, bounds, states, _disassemble(z.grad, bounds, len(views), n))
    return _result(loss, extras)


def _check_micro_batch(micro_batch) -> int:
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, numbers.Integral):
        raise TypeError(f"grad_cache_backward: micro_batch must be a positive integer (images per "
                        f"forward), got {micro_batch!r} ({type(micro_batch).__name__})")
    if micro_batch < 1:
        raise ValueError(f"grad_cache_backward: micro_batch must be >= 1 (images per forward), "
                         f"got {micro_batch}")
    return int(micro_batch)


def _as_views(inputs) -> tuple:
    views = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not views or not all(isinstance(v, torch.Tensor) for v in views):
        raise TypeError("grad_cache_backward: inputs must be a tensor or a non-empty tuple of tensors")
    n = views[0].shape[0] if views[0].dim() else 0
    if n == 0 or any(v.dim() == 0 or v.shape[0] != n for v in views):
        shapes = [tuple(v.shape) for v in views]
        raise ValueError(f"grad_cache_backward: the views must hold the same number (>= 1) of "
                         f"images along dim 0, got shapes {shapes}")
    return views


def _slice(views: tuple, start: int, end: int) -> torch.Tensor:
    if len(views) == 1:
        return views[0][start:end]
    return torch.cat([v[start:end] for v in views])


def _embeddings(out, rows: int) -> torch.Tensor:
    z = out[-1] if isinstance(out, (tuple, list)) else out
    if not isinstance(z, torch.Tensor) or z.dim() == 0 or z.shape[0] != rows:
        got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"grad_cache_backward: the model must return one embedding per input row "
                         f"({rows}), or a tuple whose last element does; got {got}")
    return z


def _backward(tensor, grad=None) -> None:
    """backward outside any autocast region (it would recast the backward's own ops)."""
    with contextlib.ExitStack() as stack:
        for kind in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            stack.enter_context(torch.autocast(kind, enabled=False))
        tensor.backward(grad)


def _split_loss(out):
    return (out[0], out[1:]) if isinstance(out, tuple) else (out, None)


def _result(loss, extras):
    if extras is None:
        return loss.detach()
    return (loss.detach(), *extras)


class _RandomState:
    """The CPU generator's state and, when the micro-batch is on a GPU, that device's."""

    def __init__(self, device: torch.device):
        self.device = device if device.type == "cuda" else None
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _first_pass(model, views: tuple, bounds: list) -> tuple:
    """Each micro-batch's random state and embeddings, without autograd (BatchNorm's running
    statistics are updated here, once per micro-batch)."""
    states, pieces = [], []
    with torch.no_grad():
        for start, end in bounds:
            states.append(_RandomState(views[0].device))
            pieces.append(_embeddings(model(_slice(views, start, end)), len(views) * (end - start)))
    states.append(_RandomState(views[0].device))  # where the random state is left at the end
    return states, pieces


def _assemble(pieces: list, v: int) -> torch.Tensor:
    """Micro-batch outputs (each its views stacked) -> view-major rows of the whole batch."""
    if v == 1:
        return torch.cat(pieces)
    return torch.cat([p.chunk(v)[k] for k in range(v) for p in pieces])


def _disassemble(grad: torch.Tensor, bounds: list, v: int, n: int) -> list:
    """The inverse of _assemble: each micro-batch's rows of the embeddings' gradient."""
    return [torch.cat([grad[k * n + start:k * n + end] for k in range(v)]) for start, end in bounds]


def _second_pass(model, views: tuple, bounds: list, states: list, grads: list) -> None:
    """Re-forward each micro-batch with autograd under its first pass's random state and
    back-propagate its cached gradient; DDP synchronises on the last one only."""
    no_sync = getattr(model, "no_sync", None)
    try:
        with _running_stats_frozen(model):
            for i, ((start, end), grad) in enumerate(zip(bounds, grads)):
                last = i == len(bounds) - 1
                with contextlib.nullcontext() if last or no_sync is None else no_sync():
                    states[i].restore()
                    z = _embeddings(model(_slice(views, start, end)), len(views) * (end - start))
                    _backward(z, grad.to(z.dtype))
    finally:
        states[-1].restore()


@contextlib.contextmanager
def _running_stats_frozen(model):
    """BatchNorm normalises by the batch's statistics but leaves its running ones alone."""
    modules = model.modules() if isinstance(model, torch.nn.Module) else ()
    frozen = [m for m in modules if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
              and m.training and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True
