"""The CPU harness of the CUDA kernels itself (tests/cuda_on_cpu/): its runtime catches what a GPU
would do wrong or hang on, and impl="cuda" reaches it on CPU tensors only once it is loaded.
The kernels' own checks are the "cuda_on_cpu" rows of the shared test tables."""
import os
import subprocess

import pytest
import torch

import cuda_on_cpu
import fastclr
from fastclr import _dispatch, ops

needs_harness = pytest.mark.skipif(bool(cuda_on_cpu.unavailable()), reason=cuda_on_cpu.unavailable())


@pytest.fixture(scope="module")
def runtime_checks(tmp_path_factory):
    """runtime_checks.cpp built against the harness's runtime alone (no torch)."""
    exe = tmp_path_factory.mktemp("runtime") / "runtime_checks"
    cmd = [os.environ.get("CXX", "g++"), "-std=c++20", "-O1", "-pthread", f"-I{cuda_on_cpu.HERE}",
           "-isystem", str(cuda_on_cpu.cuda_include()), str(cuda_on_cpu.HERE / "runtime_checks.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True)
    return exe


@needs_harness
@pytest.mark.parametrize("case, says", [
    ("divergent", "__syncthreads reached after a thread of the block returned"),
    ("partial-mask", "a shuffle with a partial mask"),
    ("deadlock", "block (0,0,0) still running after 2 s"),
    ("smem-no-optin", "65536 bytes of dynamic shared memory over the kernel's limit 49152"),
    ("smem-over-arch", "an opt-in of 204800 bytes of dynamic shared memory, over the arch's limit"),
    ("block-too-big", "a block of 2048 threads"),
])
def test_runtime_aborts_naming_the_defect(runtime_checks, case, says):
    out = subprocess.run([str(runtime_checks), case], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, FASTCLR_CUDA_ON_CPU_TIMEOUT="2"))
    assert out.returncode != 0 and says in out.stderr, (out.returncode, out.stderr)


@needs_harness
def test_runtime_runs_a_correct_kernel(runtime_checks):
    out = subprocess.run([str(runtime_checks), "ok"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["sum", str(sum(range(384)))]  # shuffles, shared memory, atomics
    out = subprocess.run([str(runtime_checks), "smem-poisoned"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["first", "byte", "255"]  # unwritten dynamic shared memory: 0xff


@pytest.mark.cuda_on_cpu
@needs_harness
def test_impl_cuda_takes_cpu_tensors_once_loaded(monkeypatch):
    assert ops.cuda_on_cpu()  # conftest loaded it for this cuda_on_cpu test
    cpu = torch.device("cpu")
    assert _dispatch.resolve("nt_xent_fused", "cuda", cpu, torch.float32).name == "cuda"
    assert _dispatch.resolve("nt_xent_fused", "auto", cpu, torch.float32).name == "cpu"  # never picked by auto
    assert ops.library("cuda", cpu) is torch.ops.fastclr_cuda_on_cpu
    assert ops.library("cpu", cpu) is torch.ops.fastclr
    s = torch.ops.fastclr_cuda_on_cpu.normalized_similarity(torch.ones(2, 3), torch.ones(4, 3))
    torch.testing.assert_close(s, torch.ones(2, 4))
    monkeypatch.setattr(ops, "_cuda_on_cpu", False)
    with pytest.raises(ValueError, match="impl='cuda' needs CUDA tensors"):
        fastclr.nt_xent_fused(torch.randn(3, 2), torch.randn(3, 2), impl="cuda")
