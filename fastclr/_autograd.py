"""The autograd formulas shared by every backend's forward ops.

NT-Xent and SupCon (one op pair, fastclr/_boundary.py has the signatures): each backend registers
a forward op (z1, z2, temperature, *, labels, options) -> (row_loss, stats, norm, rank) and a
backward op; this wires them together, saving only z, the labels, the temperature, the norms,
the (4, M) per-row statistics and the options (one ``KernelOptions``).

Normalized similarity: every backend's forward (a, b) -> s shares the composite
``fastclr::normalized_similarity_backward`` (grad, a, b, s).

Double backward (``create_graph=True``, e.g. a gradient penalty): the fused backward kernels are
not themselves differentiable, so then the gradient is computed through the pure-PyTorch
reference formula instead -- differentiable, exact, but with the reference's O(M^2) memory. Plain
backward never takes that path.
"""
import torch

from fastclr import reference
from fastclr._boundary import KernelOptions, local_row_mask, second_view


def _reference_vjp(fn, inputs, needs, grad):
    """The vector-Jacobian product of the reference ``fn`` at ``inputs`` (the saved tensors,
    which keep their autograd history), as a graph: create_graph=True gets true second
    derivatives. None for the inputs that need no gradient."""
    wanted = [x for x, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        out = fn(*inputs)
        got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(got) if need else None for need in needs)


def _reference_rows(labels, options: KernelOptions):
    """The reference's per-row losses as a function of (z1, z2, temperature), 0 outside the
    local rows."""
    def rows(z1, z2, t):
        if labels is None:
            out = reference.nt_xent(z1, z2, t, reduction="none")
        else:
            out = reference.supcon(torch.cat([z1, second_view(z1, z2)]), labels, t,
                                   "mean" if options.mean_positives else "sum", reduction="none")
        if options.row_lo == 0 and options.row_count < 0:
            return out
        mask = local_row_mask(out.shape[0], z1.shape[0], labels is None, options.row_lo,
                              options.row_count, out.device)
        return torch.where(mask, out, 0)
    return rows


def autograd_formula(backward_op):
    """(backward, setup_context) for torch.library.register_autograd of a forward op whose
    backward op is ``backward_op``; gradients for the positional inputs (z1, z2, temperature)."""

    def setup_context(ctx, inputs, keyword_only_inputs, output):
        z1, z2, temperature, labels = inputs
        _, stats, norm, _ = output
        ctx.save_for_backward(z1, z2, temperature, labels, norm, stats)
        ctx.options = KernelOptions.of(keyword_only_inputs)

    def backward(ctx, grad_rows, _grad_stats, _grad_norm, _grad_rank):
        z1, z2, temperature, labels, norm, stats = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]  # z1, z2, temperature (labels: integers)
        if grad_rows is None:
            grads = ()
        elif torch.is_grad_enabled():  # create_graph=True: a graph through the gradient
            grads = _reference_vjp(_reference_rows(labels, ctx.options), (z1, z2, temperature),
                                   needs, grad_rows)
        else:
            g1, g2, gt = backward_op(grad_rows, z1, z2, temperature, norm, stats, labels,
                                     **ctx.options.backward_kwargs())
            grads = tuple(g if need else None for g, need in zip((g1, g2, gt.to(temperature.dtype)), needs))
        return _padded(grads, len(ctx.needs_input_grad))

    return backward, setup_context


def _padded(grads: tuple, inputs: int) -> tuple:
    """One gradient per input: ``grads`` for the first ones, None for the rest."""
    return (*grads, *(None,) * (inputs - len(grads)))


def similarity_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def similarity_backward(ctx, grad):
    a, b, out = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True
        return _reference_vjp(reference.normalized_similarity, (a, b), ctx.needs_input_grad[:2], grad)
    return torch.ops.fastclr.normalized_similarity_backward(grad, a, b, out)
