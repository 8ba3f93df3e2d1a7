"""The fused CPU kernel (impl="cpu") against the float64 reference, forward and backward."""
import pytest
import torch

import fastclr
from fastclr import reference
from nt_xent_checks import (check_accuracy, check_against_reference, check_half, fused,
                            make_inputs, max_rel, run)

pytestmark = pytest.mark.skipif(not fastclr.extension_available(),
                                reason=f"extension not built: {fastclr.extension_error()}")

SHAPES = [(1, 8), (2, 5), (3, 1), (37, 19), (200, 64), (1000, 130)]
TAUS = [0.05, 0.1, 0.5, 1.0]


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("tau", TAUS)
def test_float32_matches_reference(seed, n, d, tau):
    check_against_reference("cpu", n, d, tau)


@pytest.mark.parametrize("n,d", [(3, 7), (37, 19), (300, 64)])
def test_float64_matches_reference_to_double_precision(seed, n, d):
    check_against_reference("cpu", n, d, 0.2, dtype=torch.float64, loss_tol=1e-12, grad_tol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,d", [(5, 3), (37, 19), (300, 130)])
def test_reductions(seed, reduction, n, d):
    check_against_reference("cpu", n, d, 0.2, reduction=reduction)


@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_large_and_tiny_norms(seed, scale):
    check_against_reference("cpu", 50, 33, 0.1, scale=scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(37, 19), (300, 128)])
def test_half_inputs(seed, dtype, n, d):
    check_half("cpu", n, d, 0.1, dtype)


@pytest.mark.parametrize("n,d", [(1, 4), (2, 3), (50, 16), (150, 24)])
def test_accuracy(seed, n, d):
    check_accuracy("cpu", n, d)


def test_gradcheck_float64(seed):
    z1, z2 = make_inputs(4, 6, torch.float64)
    z1.requires_grad_(), z2.requires_grad_()
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b, tt: fastclr.nt_xent_fused(a, b, tt, impl="cpu", reduction=reduction),
            (z1, z2, t))


def test_zero_rows_follow_f_normalize(seed):
    """A zero row normalises to 0 (its norm is clamped to 1e-12) and its gradient is g / eps,
    exactly as autograd through F.normalize gives."""
    z1, z2 = make_inputs(6, 5, torch.float64)
    z1[2] = 0
    loss, g1, g2, gt = run(fused("cpu"), z1, z2, 0.5)
    rloss, r1, r2, rt = run(reference.nt_xent, z1, z2, 0.5)
    torch.testing.assert_close(loss, rloss)
    torch.testing.assert_close(g1, r1)
    torch.testing.assert_close(g2, r2)
    torch.testing.assert_close(gt, rt)


def test_non_finite_input_gives_non_finite_loss():
    z1, z2 = make_inputs(8, 4)
    z1[3, 1] = float("nan")
    rows = fastclr.nt_xent_fused(z1, z2, impl="cpu", reduction="none")
    ref_rows = reference.nt_xent(z1, z2, reduction="none")
    assert torch.isnan(ref_rows).all()
    assert torch.isnan(rows).all()


def test_non_contiguous_inputs(seed):
    base = torch.randn(40, 2 * 24)
    z1, z2 = base[:, ::2], base[:, 1::2].t().contiguous().t()
    assert not z1.is_contiguous() and not z2.is_contiguous()
    loss, g1, g2, gt = run(fused("cpu"), z1, z2, 0.3)
    rloss, r1, r2, rt = run(reference.nt_xent, z1.double(), z2.double(), 0.3)
    assert max_rel(loss, rloss) < 1e-5 and max_rel(g1, r1) < 1e-4 and max_rel(g2, r2) < 1e-4


def test_backward_is_deterministic_across_thread_counts(seed):
    """The round-robin tile schedule makes the backward bitwise independent of threads."""
    z1, z2 = make_inputs(700, 40)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(run(fused("cpu"), z1, z2, 0.2))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_matches_lightly(seed):
    lightly_loss = pytest.importorskip("lightly.loss")
    z1, z2 = make_inputs(64, 32, correlated=True)
    for tau in (0.1, 0.5):
        theirs = lightly_loss.NTXentLoss(temperature=tau)
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        ours_a, ours_b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        lt = theirs(a, b)
        lo = fastclr.nt_xent_fused(ours_a, ours_b, tau, impl="cpu")
        torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-6)
        lt.backward(), lo.backward()
        torch.testing.assert_close(ours_a.grad, a.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(ours_b.grad, b.grad, rtol=1e-4, atol=1e-7)
