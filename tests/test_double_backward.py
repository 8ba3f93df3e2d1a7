"""Double backward (create_graph=True, e.g. a gradient penalty): the fused ops' gradients are
differentiable through the reference formula, equal to its second derivatives, never zeros."""
import pytest
import torch

import fastclr
from fastclr import reference
from test_loss import backends

needs_ext = pytest.mark.skipif(not fastclr.extension_available(), reason="extension not built")


@needs_ext
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_nt_xent_gradgradcheck(seed, impl):
    z1 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b, t: fastclr.nt_xent_fused(a, b, t, impl=impl, reduction="none")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (z1, z2, t))


@pytest.mark.parametrize("impl,device", backends("cpu", "triton_interp", "cuda_on_cpu", "triton_cuda", "cuda"))
def test_gradient_penalty_matches_reference(seed, impl, device):
    """The issue's repro: grad(g.pow(2).sum(), z1) with g = grad(loss, z1, create_graph=True)."""
    z1 = torch.randn(8, 16, device=device, requires_grad=True)
    z2 = torch.randn(8, 16, device=device, requires_grad=True)
    t = torch.tensor(0.5, device=device, requires_grad=True)

    def second(loss_fn):
        g = torch.autograd.grad(loss_fn(z1, z2, t), z1, create_graph=True)[0]
        return torch.autograd.grad(g.pow(2).sum(), (z1, t))
    got = second(lambda a, b, t: fastclr.nt_xent_fused(a, b, t, impl=impl))
    want = second(lambda a, b, t: reference.nt_xent(a.double(), b.double(), t.double()))
    for g, w in zip(got, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-6)


@needs_ext
def test_normalized_similarity_gradgradcheck(seed):
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: fastclr.normalized_similarity(a, b, impl="cpu"), (a, b))
