"""The loss kernels' boundary (fastclr/_boundary.py, csrc/ops.cpp): one signature for every backend
-- the tensors positional, every option by keyword, the second view optional -- and one set of
the kernels' own invariants (csrc/nt_xent_common.h for the C++ and CUDA kernels, the fake
kernel's check for Triton), so every backend refuses the same bad input with the same words."""
import pytest
import torch

from fastclr import _dispatch, ops
from fastclr._boundary import KernelOptions
from nt_xent_checks import backends

BACKENDS = backends("cpu", "triton_interp", "cuda_on_cpu", "triton_cuda", "cuda")


def forward_op(impl, device):
    return _dispatch.resolve("nt_xent_fused", impl, torch.device(device), torch.float32).kernel


def _inputs(device, m=12, d=5):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(m, d, generator=g).to(device)
    return z, torch.tensor(0.3, device=device), (torch.arange(m) % 4).to(device)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_no_second_view_is_every_row_in_the_first(impl, device):
    z, t, labels = _inputs(device)
    fwd = forward_op(impl, device)
    alone = fwd(z, None, t, labels, mean_positives=True, compute_accuracy=True)
    split = fwd(z[:5], z[5:], t, labels, mean_positives=True, compute_accuracy=True)
    for a, b in zip(alone, split):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("case, message", [
    ("complex labels", "labels must be an integer tensor"),
    ("float labels", "labels must be an integer tensor"),
    ("labels of another length", r"labels must be \(12,\)"),
    ("views of two shapes", "same shape"),
    ("views of two dtypes", "share a dtype"),
    ("a temperature of two elements", "temperature must be a 0-dim tensor"),
])
def test_every_backend_refuses_the_same_input_with_the_same_words(impl, device, case, message):
    z, t, labels = _inputs(device)
    args, kw = {
        "complex labels": ((z, None, t, labels.to(torch.complex64)), {}),
        "float labels": ((z, None, t, labels.float()), {}),
        "labels of another length": ((z, None, t, labels[:-1]), {}),
        "views of two shapes": ((z[:5], z[5:], t), {}),
        "views of two dtypes": ((z[:6], z[6:].double(), t), {}),
        "a temperature of two elements": ((z[:6], z[6:], t.repeat(2)), {}),
    }[case]
    with pytest.raises(RuntimeError, match=message):
        forward_op(impl, device)(*args, **kw)


def test_options_travel_as_one_object():
    options = KernelOptions(mean_positives=True, compute_accuracy=True, row_lo=2, row_count=3)
    assert KernelOptions.of({"labels": None, **options.forward_kwargs()}) == options
    assert "compute_accuracy" not in options.backward_kwargs()


@pytest.mark.skipif(not ops.extension_available(), reason="needs the compiled extension")
def test_options_are_keyword_only():
    z, t, labels = _inputs("cpu")
    with pytest.raises(RuntimeError):  # the old positional call no longer means anything
        torch.ops.fastclr.nt_xent_forward(z, None, t, labels, True, True)
    schema = str(torch.ops.fastclr.nt_xent_forward.default._schema)
    assert "Tensor? labels=None, *, bool mean_positives" in schema
