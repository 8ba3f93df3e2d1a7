import pytest
import torch


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
