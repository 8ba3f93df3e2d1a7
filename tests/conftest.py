import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through triton's interpreter. triton
# decides that when a kernel is defined, so this must precede the first `import fastclr`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_suite.sh runs these)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """Fresh random inputs every run (never fixed data), but printed so a failure replays."""
    s = torch.seed() % (2**31)
    torch.manual_seed(s)
    print(f"torch seed {s}")
    return s


@pytest.fixture(autouse=True)
def _cuda_kernels_on_cpu(request):
    """Tests marked cuda_on_cpu (the "cuda_on_cpu" backend rows) run impl="cuda" on CPU tensors:
    the CUDA kernels' CPU harness is built (once, incrementally) and loaded first."""
    if request.node.get_closest_marker("cuda_on_cpu") is not None:
        import cuda_on_cpu
        cuda_on_cpu.load()


@pytest.fixture
def without_cuda_on_cpu(monkeypatch):
    """As in a user's process, where the CPU harness is never loaded: impl="cuda" needs CUDA
    tensors (the harness may have been loaded by an earlier test)."""
    from fastclr import ops
    monkeypatch.setattr(ops, "_cuda_on_cpu", False)
