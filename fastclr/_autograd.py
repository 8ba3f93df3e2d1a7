"""The autograd formulas shared by every backend's forward ops.

NT-Xent and SupCon (one op pair): each backend registers a forward op (z1, z2, labels,
temperature, mean_positives, compute_accuracy) -> (row_loss, stats, norm, rank) and a backward op
(grad_rows, z1, z2, labels, temperature, mean_positives, norm, stats) -> (grad_z1, grad_z2,
grad_temperature); this wires them together, saving only z, the labels, the temperature, the
norms and the (4, M) per-row statistics.

Normalized similarity: every backend's forward (a, b) -> s shares the composite
``fastclr::normalized_similarity_backward`` (grad, a, b, s).

Double backward (``create_graph=True``, e.g. a gradient penalty): the fused backward kernels are
not themselves differentiable, so then the gradient is computed through the pure-PyTorch
reference formula instead -- differentiable, exact, but with the reference's O(M^2) memory. Plain
backward never takes that path.
"""
import torch

from fastclr import reference


def _reference_vjp(fn, inputs, needs, grad):
    """The vector-Jacobian product of the reference ``fn`` at ``inputs`` (the saved tensors,
    which keep their autograd history), as a graph: create_graph=True gets true second
    derivatives. None for the inputs that need no gradient."""
    wanted = [x for x, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        out = fn(*inputs)
        got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(got) if need else None for need in needs)


def local_rows(row_lo: int, row_count: int, n: int, m: int, paired: bool) -> tuple:
    """(lo, count, span) of local-rows mode (csrc/ops.cpp), checked: the rows i with (i mod span)
    in [lo, lo + count), span = N (paired) or M (labels); row_count = -1: to the end."""
    span = n if paired else m
    count = span - row_lo if row_count < 0 else row_count
    if not (row_lo >= 0 and count >= 0 and row_lo + count <= span):
        raise ValueError(f"fastclr: local rows [{row_lo}, {row_lo} + {count}) must lie within [0, {span})")
    return row_lo, count, span


def local_row_mask(m: int, n: int, paired: bool, row_lo: int, row_count: int, device=None):
    """(M,) mask of the rows that get a loss in local-rows mode (see :func:`local_rows`)."""
    row_lo, count, span = local_rows(row_lo, row_count, n, m, paired)
    i = torch.arange(m, device=device) % span
    return (i >= row_lo) & (i < row_lo + count)


def _reference_rows(labels, mean_positives, row_lo=0, row_count=-1):
    """The reference's per-row losses as a function of (z1, z2, temperature), 0 outside the
    local rows."""
    def rows(z1, z2, t):
        if labels is None:
            out = reference.nt_xent(z1, z2, t, reduction="none")
        else:
            out = reference.supcon(torch.cat([z1, z2]), labels, t,
                                   "mean" if mean_positives else "sum", reduction="none")
        if row_lo == 0 and row_count < 0:
            return out
        mask = local_row_mask(out.shape[0], z1.shape[0], labels is None, row_lo, row_count, out.device)
        return torch.where(mask, out, 0)
    return rows


def autograd_formula(backward_op):
    """(backward, setup_context) for torch.library.register_autograd."""

    def setup_context(ctx, inputs, output):
        z1, z2, labels, temperature, mean_positives, _, row_lo, row_count = inputs
        _, stats, norm, _ = output
        ctx.save_for_backward(z1, z2, labels, temperature, norm, stats)
        ctx.mean_positives = mean_positives
        ctx.rows = (row_lo, row_count)

    def backward(ctx, grad_rows, _grad_stats, _grad_norm, _grad_rank):
        z1, z2, labels, temperature, norm, stats = ctx.saved_tensors
        if grad_rows is None:
            return None, None, None, None, None, None, None, None
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3])
        if torch.is_grad_enabled():  # create_graph=True: a graph through the gradient
            g1, g2, gt = _reference_vjp(_reference_rows(labels, ctx.mean_positives, *ctx.rows),
                                        (z1, z2, temperature), needs, grad_rows)
            return g1, g2, None, gt, None, None, None, None
        grad_z1, grad_z2, grad_t = backward_op(grad_rows, z1, z2, labels, temperature,
                                               ctx.mean_positives, norm, stats, *ctx.rows)
        grad_t = grad_t.to(temperature.dtype) if needs[2] else None
        return grad_z1, grad_z2, None, grad_t, None, None, None, None

    return backward, setup_context


def similarity_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def similarity_backward(ctx, grad):
    a, b, out = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return _reference_vjp(reference.normalized_similarity, (a, b), ctx.needs_input_grad[:2], grad)
    return torch.ops.fastclr.normalized_similarity_backward(grad, a, b, out)
