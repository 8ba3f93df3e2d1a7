"""The temperature: checked in eager and compiled code alike (on the host for floats and CPU
tensors, by a device-side assert otherwise), 1/tau must not overflow, and the loss modules' is
settable, a tensor or learnable."""
import math

import pytest
import torch

import fastclr

needs_ext = pytest.mark.skipif(not fastclr.extension_available(), reason="extension not built")

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
