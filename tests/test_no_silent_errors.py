"""Defects a cross-check against the peers' own code found (issue 15): each was a silently wrong
answer, each is now either right or a clear error."""
import math
import warnings

import numpy as np
import pytest
import torch

import fastclr
from fastclr import ops, reference
from nt_xent_checks import google_contrast_acc
from test_loss import backends

needs_ext = pytest.mark.skipif(not fastclr.extension_available(), reason="extension not built")


# 1. Double backward: equal to the reference's second derivatives, never zeros.

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


# 2, 3. Temperature: checked in eager and compiled code alike; 1/tau must not overflow.

BAD_TEMPERATURES = [-1.0, 0.0, math.nan, math.inf, 1e-39]


@needs_ext
@pytest.mark.parametrize("bad", BAD_TEMPERATURES)
def test_bad_temperature_tensor_raises_in_eager_and_compiled(bad):
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="temperature"):
        fastclr.nt_xent_fused(z1, z2, torch.tensor(bad), impl="cpu")
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, t: fastclr.nt_xent_fused(a, b, t, impl="cpu"), fullgraph=True)
    with pytest.raises(RuntimeError, match="temperature"):
        compiled(z1, z2, torch.tensor(bad))
    torch.testing.assert_close(compiled(z1, z2, torch.tensor(0.5)),
                               fastclr.nt_xent_fused(z1, z2, 0.5, impl="cpu"))


@pytest.mark.parametrize("bad", BAD_TEMPERATURES)
def test_bad_float_temperature_raises(bad):
    with pytest.raises(ValueError, match="temperature"):
        fastclr.nt_xent_fused(torch.randn(4, 3), torch.randn(4, 3), bad)


def test_tiny_temperature_names_the_bound():
    with pytest.raises(ValueError, match="1/temperature overflows float32"):
        fastclr.nt_xent_fused(torch.randn(4, 3), torch.randn(4, 3), 1e-39)
    # float64 has room for it
    loss = fastclr.nt_xent_fused(torch.randn(4, 3, dtype=torch.float64),
                                 torch.randn(4, 3, dtype=torch.float64), 1e-39, impl="reference")
    assert torch.isfinite(loss)


def test_learnable_temperature_drifting_to_zero_raises():
    crit = fastclr.NTXentLoss(0.5, learnable_temperature=True)
    with torch.no_grad():
        crit.log_temperature.fill_(-100.0)  # exp(-100) = 3.7e-44: 1/tau overflows float32
    with pytest.raises(ValueError, match="temperature"):
        crit(torch.randn(4, 3), torch.randn(4, 3))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bad_cuda_temperature_asserts_on_device():
    z = torch.randn(4, 3, device="cuda")
    with pytest.raises(RuntimeError):
        fastclr.nt_xent_fused(z, z, torch.tensor(-1.0, device="cuda"))
        torch.cuda.synchronize()


# 4. contrast_acc: google-research/simclr's metric, exactly.

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


# 5. LARS coming from lightly: a weight_decay=0 group without 'exclude' is adapted, and it says so.

def test_lars_warns_once_about_lightly_exclusion_rule():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="exclude") as record:
        fastclr.LARS([{"params": [a], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    assert sum("exclude" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastclr.LARS([{"params": [a], "weight_decay": 0.0, "exclude": True}], lr=0.1)
        fastclr.LARS(fastclr.lars_param_groups(torch.nn.Linear(3, 2), 0.0), lr=0.1)
        fastclr.LARS([a], lr=0.1)  # default weight decay 1e-6


# 6. Float32 gradients on saturated batches: at least as accurate as lightly's.

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


# 7. 64-bit offsets in the Triton kernels.

if ops.triton_interpreting():
    import triton
    import triton.language as tl
    from fastclr.triton.nt_xent import _row_offset

    @triton.jit
    def _offsets_kernel(rows_ptr, out_ptr, stride, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, _row_offset(tl.load(rows_ptr + i), stride))


@pytest.mark.skipif(not ops.triton_interpreting(), reason="runs the Triton interpreter on CPU tensors")
def test_triton_row_offsets_do_not_wrap_at_2_31():
    rows = torch.tensor([0, 1, 2**21 - 1, 2**21, 2**21 + 7, 2**22, 2**30, 2**31 - 1], dtype=torch.int32)
    out = torch.empty(8, dtype=torch.int64)
    _offsets_kernel[(1,)](rows, out, 1024, BLOCK=8)
    assert out.tolist() == [r * 1024 for r in rows.tolist()]  # 2N D = 2^21 * 1024 = 2^31 and past


# 8. Frictions of a drop-in swap.

def test_module_temperature_is_settable_and_takes_tensors():
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    crit = fastclr.NTXentLoss(0.5)
    crit.temperature = 0.2
    torch.testing.assert_close(crit(z1, z2), fastclr.nt_xent_fused(z1, z2, 0.2))
    learn = fastclr.NTXentLoss(0.5, learnable_temperature=True)
    learn.temperature = 0.2
    assert math.isclose(learn.temperature.item(), 0.2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        crit.temperature = -1.0
    t = torch.tensor(0.2, requires_grad=True)
    tensor_crit = fastclr.NTXentLoss(temperature=t)
    tensor_crit(z1, z2).backward()
    assert t.grad is not None and t.grad.abs() > 0
    assert "tensor(0.2)" in repr(tensor_crit)


def test_module_process_group_and_lightly_gather_flag():
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    for crit in (fastclr.NTXentLoss(0.5, process_group=None),
                 fastclr.NTXentLoss(0.5, gather_distributed=True)):  # one process: no gather
        torch.testing.assert_close(crit(z1, z2), fastclr.nt_xent_fused(z1, z2, 0.5))
    with pytest.raises(TypeError, match="process_group"):
        fastclr.NTXentLoss(0.5, process_group=object())
    with pytest.raises(TypeError, match="nt_xent_fused: process_group"):
        fastclr.nt_xent_fused(z1, z2, 0.5, process_group=object())


def test_lars_takes_tensor_learning_rates():
    torch.manual_seed(0)
    p1, p2 = torch.nn.Parameter(torch.randn(4, 3)), None
    p2 = torch.nn.Parameter(p1.detach().clone())
    for p in (p1, p2):
        p.grad = torch.ones_like(p)
    fastclr.LARS([p1], lr=torch.tensor(0.1)).step()
    fastclr.LARS([p2], lr=0.1).step()
    torch.testing.assert_close(p1, p2)
    with pytest.raises(ValueError, match="lr"):
        fastclr.LARS([p1], lr=torch.tensor(-0.1))


def test_knn_topk_takes_integer_like_k():
    q, bank = torch.randn(5, 4), torch.randn(20, 4)
    v, i = fastclr.knn_topk(q, bank, np.int64(5), chunk=np.int32(7))
    v2, i2 = fastclr.knn_topk(q, bank, 5)
    assert torch.equal(i, i2) and torch.equal(v, v2)
    with pytest.raises(TypeError, match="k must be an int"):
        fastclr.knn_topk(q, bank, 5.0)
