"""The public API: input checks, dispatch, the module, registrations (opcheck, compile)."""
import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import fastclr
from fastclr import loss as loss_module
from fastclr import _dispatch, ops, reference
from nt_xent_checks import make_inputs

needs_ext = pytest.mark.skipif(not fastclr.extension_available(),
                               reason=f"extension not built: {fastclr.extension_error()}")


@pytest.mark.parametrize("impl", ["auto", "reference", "cpu"])
@pytest.mark.parametrize("args,kwargs,exc,words", [
    ((torch.randn(4, 3), torch.randn(5, 3)), {}, ValueError, ["same shape", "(4, 3)", "(5, 3)"]),
    ((torch.randn(4, 3, 2), torch.randn(4, 3, 2)), {}, ValueError, ["z1", "2-D", "(4, 3, 2)"]),
    ((torch.randn(4), torch.randn(4)), {}, ValueError, ["z1", "2-D"]),
    ((torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64)), {}, TypeError,
     ["z1", "float32", "torch.int64"]),
    ((torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)), {}, TypeError,
     ["same dtype", "torch.float32", "torch.float64"]),
    ((torch.randn(4, 3), torch.randn(4, 3).to("meta")), {}, ValueError, ["same device", "meta"]),
    ((torch.randn(0, 3), torch.randn(0, 3)), {}, ValueError, ["N >= 1", "(0, 3)"]),
    ((torch.randn(4, 0), torch.randn(4, 0)), {}, ValueError, ["D >= 1"]),
    (([[1.0]], torch.randn(1, 1)), {}, TypeError, ["z1", "torch.Tensor", "list"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"temperature": 0.0}, ValueError, ["temperature", "> 0", "0.0"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"temperature": -0.1}, ValueError, ["temperature", "-0.1"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"temperature": math.nan}, ValueError, ["temperature", "nan"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"temperature": math.inf}, ValueError, ["temperature", "inf"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"temperature": torch.tensor(-1.0)}, ValueError, ["temperature", "-1.0"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"temperature": torch.tensor([0.5])}, ValueError, ["temperature", "0-dim", "(1,)"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"temperature": torch.tensor(1)}, TypeError, ["temperature", "floating"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"temperature": "0.5"}, TypeError, ["temperature", "str"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"temperature": True}, TypeError, ["temperature", "bool"]),
    ((torch.randn(4, 3), torch.randn(4, 3)), {"reduction": "avg"}, ValueError, ["reduction", "'avg'", "mean"]),
])
def test_bad_input_names_argument(impl, args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        fastclr.nt_xent_fused(*args, impl=impl, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_unknown_impl():
    with pytest.raises(ValueError, match=r"impl must be one of .* got 'fast'"):
        fastclr.nt_xent_fused(torch.randn(3, 2), torch.randn(3, 2), impl="fast")


def test_cuda_impl_input_checks(monkeypatch, without_cuda_on_cpu):
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        fastclr.nt_xent_fused(torch.randn(3, 2), torch.randn(3, 2), impl="cuda")
    monkeypatch.setattr(ops, "compiled_with_cuda", lambda: False)
    with pytest.raises(RuntimeError, match="impl='cuda' needs the compiled CUDA kernels"):
        _dispatch.resolve("nt_xent_fused", "cuda", torch.device("cuda"), torch.float32)
    monkeypatch.setattr(ops, "compiled_with_cuda", lambda: True)
    with pytest.raises(TypeError, match="impl='cuda' supports float32.*float64"):
        _dispatch.resolve("nt_xent_fused", "cuda", torch.device("cuda"), torch.float64)


def test_auto_between_cuda_and_triton_follows_the_measured_table(monkeypatch):
    monkeypatch.setattr(ops, "compiled_with_cuda", lambda: True)
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    op = _dispatch.OPS["nt_xent_fused"]
    monkeypatch.setattr(op, "cuda_faster", {})
    assert _dispatch.resolve("nt_xent_fused", "auto", torch.device("cuda"), torch.bfloat16).name == "triton"
    monkeypatch.setattr(op, "cuda_faster", {torch.bfloat16: True})
    assert _dispatch.resolve("nt_xent_fused", "auto", torch.device("cuda"), torch.bfloat16).name == "cuda"
    assert _dispatch.resolve("nt_xent_fused", "auto", torch.device("cuda"), torch.float16).name == "triton"
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert _dispatch.resolve("nt_xent_fused", "auto", torch.device("cuda"), torch.float16).name == "cuda"


def test_triton_impl_input_checks(monkeypatch):
    if not ops.triton_available():
        with pytest.raises(RuntimeError, match="needs triton"):
            fastclr.nt_xent_fused(torch.randn(3, 2), torch.randn(3, 2), impl="triton")
        return
    with pytest.raises(TypeError, match="impl='triton' supports float32.*float64"):
        fastclr.nt_xent_fused(torch.randn(3, 2, dtype=torch.float64),
                              torch.randn(3, 2, dtype=torch.float64), impl="triton")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors.*meta"):
        fastclr.nt_xent_fused(torch.randn(3, 2, device="meta"), torch.randn(3, 2, device="meta"),
                              impl="triton")
    monkeypatch.setattr(ops, "triton_interpreting", lambda: False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fastclr.nt_xent_fused(torch.randn(3, 2), torch.randn(3, 2), impl="triton")


def test_auto_picks_triton_for_cuda_tensors(monkeypatch):
    monkeypatch.setattr(ops, "compiled_with_cuda", lambda: False)
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    assert _dispatch.resolve("nt_xent_fused", "auto", torch.device("cuda"), torch.float32).name == "triton"
    assert _dispatch.resolve("nt_xent_fused", "auto", torch.device("cuda", 1), torch.bfloat16).name == "triton"
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    monkeypatch.setattr(_dispatch.OPS["nt_xent_fused"], "warned", False)
    with pytest.warns(RuntimeWarning, match="falling back"):
        assert _dispatch.resolve("nt_xent_fused", "auto", torch.device("cuda"), torch.float32).name == "reference"


@needs_ext
def test_cpu_impl_rejects_other_devices():
    z = torch.randn(3, 2, device="meta")
    with pytest.raises(ValueError, match="impl='cpu' needs CPU tensors"):
        fastclr.nt_xent_fused(z, z, impl="cpu")


def test_fallback_without_extension_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "extension_available", lambda: False)
    monkeypatch.setattr(ops, "extension_error", lambda: "fastclr._C missing (test)")
    monkeypatch.setattr(_dispatch.OPS["nt_xent_fused"], "warned", False)
    z1, z2 = make_inputs(5, 4)
    with pytest.warns(RuntimeWarning, match="falling back to the reference.*_C missing"):
        a = fastclr.nt_xent_fused(z1, z2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = fastclr.nt_xent_fused(z1, z2)
    torch.testing.assert_close(a, reference.nt_xent(z1, z2))
    torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match="needs the compiled extension.*_C missing"):
        fastclr.nt_xent_fused(z1, z2, impl="cpu")


@needs_ext
def test_auto_picks_cpu_kernel_on_cpu(monkeypatch):
    assert _dispatch.resolve("nt_xent_fused", "auto", torch.device("cpu")).name == "cpu"
    calls = []
    real = torch.ops.fastclr.nt_xent_forward
    monkeypatch.setattr(loss_module.torch.ops.fastclr, "nt_xent_forward",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw), raising=False)
    fastclr.nt_xent_fused(*make_inputs(3, 4))
    assert calls


def test_output_dtypes_and_shapes():
    for dtype, out in [(torch.float32, torch.float32), (torch.float64, torch.float64),
                       (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]:
        z1, z2 = make_inputs(7, 5, dtype)
        assert fastclr.nt_xent_fused(z1, z2).dtype == out
        rows = fastclr.nt_xent_fused(z1, z2, reduction="none")
        assert rows.shape == (14,) and rows.dtype == out
        loss, acc = fastclr.nt_xent_fused(z1, z2, return_accuracy=True)
        assert loss.shape == () and acc["top1"].shape == () and acc["top5"].shape == ()


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_module_and_learnable_temperature(impl, seed):
    if impl == "cpu" and not fastclr.extension_available():
        pytest.skip("extension not built")
    z1, z2 = make_inputs(9, 6)
    fixed = fastclr.NTXentLoss(temperature=0.2, impl=impl)
    assert list(fixed.parameters()) == []
    torch.testing.assert_close(fixed(z1, z2), fastclr.nt_xent_fused(z1, z2, 0.2, impl=impl))
    learn = fastclr.NTXentLoss(temperature=0.2, learnable_temperature=True, impl=impl)
    (param,) = list(learn.parameters())
    assert math.isclose(learn.temperature.item(), 0.2, rel_tol=1e-6)
    loss = learn(z1, z2)
    loss.backward()
    # d/d(log tau) = tau * dL/dtau, checked against the float64 reference.
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    reference.nt_xent(z1.double(), z2.double(), t).backward()
    assert param.grad is not None
    assert math.isclose(param.grad.item(), 0.2 * t.grad.item(), rel_tol=1e-4, abs_tol=1e-6)
    _, acc = learn(z1, z2, return_accuracy=True)
    assert set(acc) == {"top1", "top5", "contrast_acc"}
    assert "learnable" in repr(learn) and "0.2" in repr(fixed)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, 1e-39])
def test_module_rejects_bad_temperature(bad):
    with pytest.raises(ValueError, match="temperature"):
        fastclr.NTXentLoss(temperature=bad)


@pytest.mark.parametrize("bad", ["x", None, torch.ones(2), torch.tensor(1)])
def test_module_rejects_temperature_of_wrong_type(bad):
    with pytest.raises(TypeError, match="NTXentLoss: temperature"):
        fastclr.NTXentLoss(temperature=bad)


def test_import_needs_no_extension():
    """`import fastclr` works (and says why) when _C cannot be loaded."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules['fastclr._C'] = None   # makes `from fastclr import _C` raise ImportError
        import fastclr, torch
        assert not fastclr.extension_available()
        assert '_C' in fastclr.extension_error()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            loss = fastclr.nt_xent_fused(torch.randn(4, 3), torch.randn(4, 3))
        assert any('falling back' in str(x.message) for x in w)
        print('ok', float(loss))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


@needs_ext
def test_opcheck_forward_and_backward(seed):
    from torch.library import opcheck
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        z1, z2 = make_inputs(37, 19, dtype)
        z1.requires_grad_(), z2.requires_grad_()
        t = torch.tensor(0.3, dtype=reference.accumulation_dtype(dtype), requires_grad=True)
        z = torch.cat([z1, z2]).detach().requires_grad_()
        labels = torch.randint(0, 9, (74,))
        # paired mode (NT-Xent) and labels mode (SupCon, both forms)
        for args, kw in (((z1, z2, t), {}), ((z, None, t), dict(labels=labels, mean_positives=True)),
                         ((z, None, t), dict(labels=labels))):
            for acc in (False, True):
                opcheck(torch.ops.fastclr.nt_xent_forward.default, args, {**kw, "compute_accuracy": acc})
            rows, stats, norm, _ = torch.ops.fastclr.nt_xent_forward(*args, **kw)
            g = torch.rand(74, dtype=rows.dtype)
            a, b, tt = args
            opcheck(torch.ops.fastclr.nt_xent_backward.default,
                    (g, a.detach(), None if b is None else b.detach(), tt.detach(), norm.detach(),
                     stats.detach()), kw)


def check_compile_fullgraph(impl, device, dtype, grad_tol):
    """torch.compile(fullgraph=True) traces nt_xent_fused and agrees with eager."""
    z1, z2 = make_inputs(300, 64, dtype, device)
    z1.requires_grad_(), z2.requires_grad_()

    def step(a, b):
        loss, acc = fastclr.nt_xent_fused(a, b, 0.2, impl=impl, return_accuracy=True)
        return loss, acc["top1"]

    compiled = torch.compile(step, fullgraph=True)
    loss, top1 = compiled(z1, z2)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    eloss, etop1 = step(z1, z2)
    e1, e2 = torch.autograd.grad(eloss, (z1, z2))
    torch.testing.assert_close(loss, eloss)
    torch.testing.assert_close(top1, etop1)
    torch.testing.assert_close(g1, e1, **grad_tol)
    torch.testing.assert_close(g2, e2, **grad_tol)


@needs_ext
def test_torch_compile_fullgraph_cpu(seed):
    check_compile_fullgraph("cpu", "cpu", torch.float32, {})


@needs_ext
def test_peak_memory_is_linear_in_batch():
    """At M = 8192, D = 128 the fused forward+backward adds far less than one M x M matrix
    (256 MiB in float32) to the process's peak resident memory. Own process: the kernel's
    high-water mark is measured from a reset (/proc/self/clear_refs)."""
    code = textwrap.dedent("""
        import torch, fastclr
        def rss(field):
            for line in open('/proc/self/status'):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        z1 = torch.randn(4096, 128, requires_grad=True)
        z2 = torch.randn(4096, 128, requires_grad=True)
        fastclr.nt_xent_fused(z1[:8], z2[:8]).backward()   # warm-up: lazy inits, thread pool
        z1.grad = z2.grad = None
        base = rss('VmRSS:')
        open('/proc/self/clear_refs', 'w').write('5')
        fastclr.nt_xent_fused(z1, z2).backward()
        print(rss('VmHWM:') - base)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.split()[-1])
    assert extra < 48 * 2**20, f"fused fwd+bwd at M=8192 added {extra / 2**20:.1f} MiB"


GPU_OPS = [
    pytest.param("nt_xent_triton_forward", "nt_xent_triton_backward", id="triton",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(
                     not (ops.triton_available() and not ops.triton_interpreting()),
                     reason="needs triton on a GPU")]),
    pytest.param("nt_xent_forward", "nt_xent_backward", id="cuda",
                 marks=[pytest.mark.cuda, pytest.mark.skipif(
                     not ops.compiled_with_cuda(), reason="built without the CUDA kernels")]),
]


@pytest.mark.parametrize("fwd_name,bwd_name", GPU_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck_on_gpu(seed, fwd_name, bwd_name, dtype):
    from torch.library import opcheck
    fwd, bwd = getattr(torch.ops.fastclr, fwd_name), getattr(torch.ops.fastclr, bwd_name)
    z1, z2 = make_inputs(300, 64, dtype, "cuda")
    z1.requires_grad_(), z2.requires_grad_()
    t = torch.tensor(0.3, device="cuda", requires_grad=True)
    z = torch.cat([z1, z2]).detach().requires_grad_()
    labels = torch.randint(0, 30, (600,), device="cuda")
    for args, kw in (((z1, z2, t), {}), ((z, None, t), dict(labels=labels, mean_positives=True))):
        for acc in (False, True):
            opcheck(fwd.default, args, {**kw, "compute_accuracy": acc})
        rows, stats, norm, _ = fwd(*args, **kw)
        g = torch.rand(600, device="cuda")
        a, b, tt = args
        # The backward's fp32 atomics sum in a varying order: no bitwise-repeatability check.
        opcheck(bwd.default, (g, a.detach(), None if b is None else b.detach(), tt.detach(), norm, stats),
                kw, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("impl", [p.id for p in GPU_OPS])
@pytest.mark.cuda
def test_torch_compile_fullgraph_gpu(seed, impl):
    if impl == "triton" and (ops.triton_interpreting() or not ops.triton_available()):
        pytest.skip("needs triton on a GPU")
    if impl == "cuda" and not ops.compiled_with_cuda():
        pytest.skip("built without the CUDA kernels")
    # fp32 atomics in the backward: the summation order, and so the last bits, vary.
    check_compile_fullgraph(impl, "cuda", torch.bfloat16, dict(rtol=1e-2, atol=1e-5))


def test_module_process_group_and_lightly_gather_flag():
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    for crit in (fastclr.NTXentLoss(0.5, process_group=None),
                 fastclr.NTXentLoss(0.5, gather_distributed=True)):  # one process: no gather
        torch.testing.assert_close(crit(z1, z2), fastclr.nt_xent_fused(z1, z2, 0.5))
    with pytest.raises(TypeError, match="process_group"):
        fastclr.NTXentLoss(0.5, process_group=object())
    with pytest.raises(TypeError, match="nt_xent_fused: process_group"):
        fastclr.nt_xent_fused(z1, z2, 0.5, process_group=object())
