"""Every fused backend against the float64 reference, forward and backward.

Backends: the C++ kernel ("cpu"); the Triton kernels on CPU tensors through triton's
interpreter ("triton_interp", small sizes, what CI runs) and on a GPU ("triton_cuda", large
sizes, run by benchmarks/gpu_suite.sh); the CUDA kernels on CPU tensors through their CPU
harness ("cuda_on_cpu", small sizes, CI) and on a GPU ("cuda", the GPU suite).
"""
import pytest
import torch

import fastclr
from fastclr import reference
from nt_xent_checks import (BACKENDS, backends, chunked_reference64, check_accuracy,
                            check_against_reference, check_half, fused, google_contrast_acc,
                            make_inputs, max_rel, needs_ext, run)

TAUS = [0.05, 0.1, 0.5, 1.0]
# Shapes per backend: the interpreter is slow, a GPU is fast.
SHAPES = {
    "cpu": [(1, 8), (2, 5), (3, 1), (37, 19), (200, 64), (1000, 130)],
    # (37, 300): wider than ROWS_MAX_D, so the pairs backward kernel runs too.
    "triton_interp": [(1, 19), (3, 64), (37, 19), (37, 130), (37, 300), (200, 19), (200, 64), (200, 130)],
    # more than one 64-row tile (the backward's off-diagonal tile pairs, the rotated column
    # order), D over one K chunk (32) and one gradient chunk (64)
    "cuda_on_cpu": [(1, 19), (3, 64), (37, 19), (37, 130), (70, 300), (100, 64)],
    "triton_cuda": [(1, 19), (37, 19), (1000, 130), (4097, 64), (8192, 128), (3000, 2048)],
    "cuda": [(1, 19), (37, 19), (1000, 130), (4097, 64), (8192, 128), (3000, 2048)],
}


def cases(shapes=SHAPES, backends=tuple(BACKENDS)):
    """pytest params (impl, device, n, d) for each backend and its shapes."""
    out = []
    for name in backends:
        impl, device, marks = BACKENDS[name]
        for n, d in shapes[name]:
            out.append(pytest.param(impl, device, n, d, marks=marks, id=f"{name}-{n}x{d}"))
    return out


@pytest.mark.parametrize("impl,device,n,d", cases())
@pytest.mark.parametrize("tau", TAUS)
def test_float32_matches_reference(seed, impl, device, n, d, tau):
    check_against_reference(impl, n, d, tau, device=device)


@pytest.mark.parametrize("impl,device", backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n,d", [(5, 3), (37, 19), (150, 130)])
def test_reductions(seed, impl, device, reduction, n, d):
    check_against_reference(impl, n, d, 0.2, device=device, reduction=reduction)


@pytest.mark.parametrize("impl,device", backends())
@pytest.mark.parametrize("scale", [1e-6, 1e4])
def test_large_and_tiny_norms(seed, impl, device, scale):
    check_against_reference(impl, 50, 33, 0.1, device=device, scale=scale)


HALF = [pytest.param(torch.float16, id="fp16"),
        pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("impl,device", backends())
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n,d", [(37, 19), (300, 128)])
def test_half_inputs(seed, impl, device, dtype, n, d):
    if device == "cpu" and impl == "triton" and dtype == torch.bfloat16:
        pytest.skip("triton's interpreter gets tl.dot wrong on bfloat16 operands; the GPU suite checks bf16")
    check_half(impl, n, d, 0.1, dtype, device=device)


@pytest.mark.parametrize("impl,device", backends())
@pytest.mark.parametrize("n,d", [(1, 4), (2, 3), (50, 16), (150, 24)])
def test_accuracy(seed, impl, device, n, d):
    check_accuracy(impl, n, d, device=device)


@pytest.mark.parametrize("impl,device", backends())
def test_zero_rows_follow_f_normalize(seed, impl, device):
    """A zero row normalises to 0 (its norm is clamped to 1e-12) and its gradient is g / eps,
    exactly as autograd through F.normalize gives."""
    z1, z2 = make_inputs(6, 5, torch.float64)
    z1[2] = 0
    dtype = torch.float64 if impl == "cpu" else torch.float32
    a, b = z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)
    loss, g1, g2, gt = run(fused(impl), a, b, 0.5)
    rloss, r1, r2, rt = run(reference.nt_xent, z1, z2, 0.5)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.cpu().double(), rloss, **tol)
    assert g1[2].abs().max() > 0  # g / eps: large, not zero
    # the zero row's gradient is ~1e12 times the others: each part checked at its own scale
    # (float32: an element far below its rows' largest may lose digits to cancellation)
    g1, rows = g1.cpu().double(), torch.arange(6) != 2
    torch.testing.assert_close(g1[2], r1[2], rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)
    torch.testing.assert_close(g1[rows], r1[rows], **tol)
    torch.testing.assert_close(g2.cpu().double(), r2, **tol)
    torch.testing.assert_close(gt.cpu().double(), rt, **tol)


@pytest.mark.parametrize("impl,device", backends())
def test_non_finite_input_gives_non_finite_loss(impl, device):
    z1, z2 = make_inputs(8, 4, device=device)
    z1[3, 1] = float("nan")
    rows = fastclr.nt_xent_fused(z1, z2, impl=impl, reduction="none")
    assert torch.isnan(reference.nt_xent(z1, z2, reduction="none")).all()
    assert torch.isnan(rows[3]) and torch.isnan(rows).all()


@pytest.mark.parametrize("impl,device", backends())
def test_non_contiguous_inputs(seed, impl, device):
    base = torch.randn(40, 2 * 24, device=device)
    z1, z2 = base[:, ::2], base[:, 1::2].t().contiguous().t()
    assert not z1.is_contiguous() and not z2.is_contiguous()
    loss, g1, g2, gt = run(fused(impl), z1, z2, 0.3)
    rloss, r1, r2, rt = run(reference.nt_xent, z1.double(), z2.double(), 0.3)
    assert max_rel(loss, rloss) < 1e-5 and max_rel(g1, r1) < 1e-4 and max_rel(g2, r2) < 1e-4


# --- the C++ kernel only ---------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("n,d", [(3, 7), (37, 19), (300, 64)])
def test_cpu_float64_matches_reference_to_double_precision(seed, n, d):
    check_against_reference("cpu", n, d, 0.2, dtype=torch.float64, loss_tol=1e-12, grad_tol=1e-10)


@needs_ext
def test_cpu_gradcheck_float64(seed):
    z1, z2 = make_inputs(4, 6, torch.float64)
    z1.requires_grad_(), z2.requires_grad_()
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b, tt: fastclr.nt_xent_fused(a, b, tt, impl="cpu", reduction=reduction),
            (z1, z2, t))


@needs_ext
def test_cpu_backward_is_deterministic_across_thread_counts(seed):
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


@needs_ext
def test_cpu_matches_lightly(seed):
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


# --- large sizes on a GPU, against a chunked float64 reference --------------------------------

def test_chunked_reference_matches_reference(seed):
    """The large-size oracle of the GPU tests agrees with the reference's autograd."""
    z1, z2 = make_inputs(37, 19, torch.float64)
    w = torch.rand(74, dtype=torch.float64)
    rows, g1, g2, gt = chunked_reference64(z1, z2, 0.2, w, chunk=16)
    _, r1, r2, rt = run(reference.nt_xent, z1, z2, 0.2, w, reduction="none")
    torch.testing.assert_close(rows, reference.nt_xent(z1, z2, 0.2, reduction="none"))
    torch.testing.assert_close(g1, r1)
    torch.testing.assert_close(g2, r2)
    torch.testing.assert_close(gt, rt)


@pytest.mark.cuda
@pytest.mark.parametrize("impl,device", backends("triton_cuda", "cuda"))
@pytest.mark.parametrize("n,d,dtype", [(8192, 128, torch.float32), (32768, 128, torch.bfloat16),
                                       (32768, 128, torch.float32)])
def test_large_batches_on_gpu(seed, impl, device, n, d, dtype):
    """M up to 65536: loss, gradients and temperature gradient against float64 chunked math."""
    z1, z2 = make_inputs(n, d, dtype, device)
    w = torch.rand(2 * n, dtype=torch.float64, device=device)
    loss, g1, g2, gt = run(fused(impl), z1, z2, 0.1, w, reduction="none")
    rows, r1, r2, rt = chunked_reference64(z1.double(), z2.double(), 0.1, w)
    # The reference runs on the very bf16-rounded inputs: what is left is the kernel's own
    # arithmetic (fp32 products of exact inputs in the forward; bf16 A tiles and bf16 output
    # rounding, 2^-8 relative, in the backward).
    loss_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-4, 2e-2)
    assert max_rel(loss, rows) <= loss_tol
    assert max_rel(g1, r1) <= grad_tol and max_rel(g2, r2) <= grad_tol
    assert abs(gt.item() - rt.item()) <= grad_tol * abs(rt.item())


# --- contrast_acc: google-research/simclr's metric, exactly ------------------------------------

@pytest.mark.parametrize("impl,device", backends())
def test_contrast_acc_equals_google_transcription(seed, impl, device):
    for n, d in ((256, 16), (37, 5), (1, 3)):
        z1 = torch.randn(n, d, device=device)
        z2 = z1 + torch.randn(n, d, device=device)
        _, acc = fastclr.nt_xent_fused(z1, z2, 0.5, impl=impl, return_accuracy=True)
        # the same count of correct rows (the fraction is float32 here, float64 there)
        assert round(acc["contrast_acc"].item() * n) == round(google_contrast_acc(z1.cpu(), z2.cpu(), 0.5) * n)
        # the two metrics differ: contrast_acc ranks against N - 1, top1 against 2N - 2 others
        ref = reference.nt_xent(z1.cpu().double(), z2.cpu().double(), 0.5, return_accuracy=True)[1]
        assert acc["top1"].item() == ref["top1"].item()


# --- float32 on saturated batches, and a single pair ----------------------------------------------

def _grad_error(loss_fn, n, d, tau, device):
    g = torch.Generator().manual_seed(n)
    z1 = torch.randn(n, d, generator=g)
    z2 = z1 + 0.2 * torch.randn(n, d, generator=g)
    grads = {}
    for dtype in (torch.float64, torch.float32):
        a = z1.to(device, dtype).requires_grad_()
        b = z2.to(device, dtype).requires_grad_()
        (reference.nt_xent(a, b, tau) if dtype == torch.float64 else loss_fn(a, b)).backward()
        grads[dtype] = torch.cat([a.grad, b.grad]).double().cpu()
    ref = grads[torch.float64]
    return ((grads[torch.float32] - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("impl,device", backends("cpu", "triton_interp", "triton_cuda", "cuda")
                         + [pytest.param("reference", "cpu", id="reference")])
@pytest.mark.parametrize("n,tau", [(256, 0.1), (1024, 0.05)])
def test_saturated_float32_gradients_beat_lightly(impl, device, n, tau):
    lightly_loss = pytest.importorskip("lightly.loss")
    ours = _grad_error(lambda a, b: fastclr.nt_xent_fused(a, b, tau, impl=impl), n, 128, tau, device)
    theirs = _grad_error(lightly_loss.NTXentLoss(temperature=tau), n, 128, tau, device)
    assert ours <= theirs, (ours, theirs)


@pytest.mark.parametrize("impl,device", backends() + [pytest.param("reference", "cpu", id="reference")])
def test_saturated_float32_row_losses_are_accurate(impl, device):
    """At low loss lse_i - s_ip cancels in float32 (~ulp(1/tau)); the kernels form the loss as
    log(1 + exp(lse_neg - s_ip)) instead. N = 1024, tau = 0.05: loss ~3e-5 a row."""
    g = torch.Generator().manual_seed(1024)
    z1 = torch.randn(1024, 128, generator=g)
    z2 = z1 + 0.2 * torch.randn(1024, 128, generator=g)
    rows = fastclr.nt_xent_fused(z1.to(device), z2.to(device), 0.05, impl=impl, reduction="none")
    ref = reference.nt_xent(z1.double(), z2.double(), 0.05, reduction="none")
    assert ((rows.double().cpu() - ref).abs() / ref).max().item() < 1e-4


@pytest.mark.parametrize("impl,device", backends() + [pytest.param("reference", "cpu", id="reference")])
def test_single_pair_has_exactly_zero_gradients(impl, device):
    """N = 1: the only other row is the positive, so the loss is exactly 0 whatever z."""
    z1 = torch.randn(1, 19, device=device, requires_grad=True)
    z2 = torch.randn(1, 19, device=device, requires_grad=True)
    t = torch.tensor(0.1, device=device, requires_grad=True)
    loss = fastclr.nt_xent_fused(z1, z2, t, impl=impl)
    loss.backward()
    assert loss.item() == 0.0
    assert z1.grad.abs().max().item() == 0.0 and z2.grad.abs().max().item() == 0.0
    assert t.grad.item() == 0.0
