"""The autograd formulas shared by every backend's forward ops.

NT-Xent: each backend registers a forward op returning (row_loss, lse, norm, rank) and a backward
op (grad_rows, z1, z2, temperature, norm, lse) -> (grad_z1, grad_z2, grad_temperature); this
wires them together, saving only z, the temperature, the norms and the logsumexps.

Normalized similarity: every backend's forward (a, b) -> s shares the composite
``fastclr::normalized_similarity_backward`` (grad, a, b, s).
"""
import torch


def autograd_formula(backward_op):
    """(backward, setup_context) for torch.library.register_autograd."""

    def setup_context(ctx, inputs, output):
        z1, z2, temperature, _ = inputs
        _, lse, norm, _ = output
        ctx.save_for_backward(z1, z2, temperature, norm, lse)

    def backward(ctx, grad_rows, _grad_lse, _grad_norm, _grad_rank):
        z1, z2, temperature, norm, lse = ctx.saved_tensors
        if grad_rows is None:
            return None, None, None, None
        grad_z1, grad_z2, grad_t = backward_op(grad_rows, z1, z2, temperature, norm, lse)
        grad_t = grad_t.to(temperature.dtype) if ctx.needs_input_grad[2] else None
        return grad_z1, grad_z2, grad_t, None

    return backward, setup_context


def similarity_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def similarity_backward(ctx, grad):
    a, b, out = ctx.saved_tensors
    return torch.ops.fastclr.normalized_similarity_backward(grad, a, b, out)
