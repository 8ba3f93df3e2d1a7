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
