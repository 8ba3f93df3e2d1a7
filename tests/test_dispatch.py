"""The one dispatcher: every op x every impl x every environment resolves as the documented dispatch
tables say (read from docs/api.md), and `import fastclr` does not import triton."""
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from fastclr import _dispatch, ops

README = Path(__file__).resolve().parent.parent / "docs" / "api.md"
# column -> (device, extension built, extension has CUDA kernels, triton importable)
ENVIRONMENTS = {
    "CPU tensors": ("cpu", True, True, True),
    "CPU, no extension": ("cpu", False, False, True),
    "CUDA tensors": ("cuda", True, True, True),
    "CUDA, no triton": ("cuda", True, True, False),
    "CUDA, extension without CUDA kernels": ("cuda", True, False, True),
    "CUDA, neither": ("cuda", False, False, False),
}
ERRORS = {"ValueError": ValueError, "RuntimeError": RuntimeError, "TypeError": TypeError}
TABLES = {"fused": ("nt_xent_fused", "supcon_fused", "normalized_similarity", "knn_topk"), "lars": ("LARS",)}


def readme_table(name):
    text = README.read_text()
    body = text.split(f"<!-- dispatch:{name} -->", 1)[1].split("<!-- dispatch:end -->", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.strip().splitlines()]
    head, cells = rows[0], rows[2:]
    return [(row[0], dict(zip(head[1:], row[1:]))) for row in cells]


def cases():
    for table, op_names in TABLES.items():
        for label, cells in readme_table(table):
            for column, expected in cells.items():
                for op in op_names:
                    yield pytest.param(op, label, column, expected, id=f"{op}-{label}-{column}")


def _environment(monkeypatch, column):
    device, ext, ext_cuda, triton = ENVIRONMENTS[column]
    monkeypatch.setattr(ops, "extension_available", lambda: ext)
    monkeypatch.setattr(ops, "compiled_with_cuda", lambda: ext and ext_cuda)
    monkeypatch.setattr(ops, "triton_available", lambda: triton)
    monkeypatch.setattr(ops, "triton_interpreting", lambda: False)
    monkeypatch.setattr(ops, "cuda_on_cpu", lambda: False)  # a user's process: no CPU harness
    monkeypatch.setattr(ops, "extension_error", lambda: "" if ext else "fastclr._C missing (test)")
    monkeypatch.setattr(ops, "triton_error", lambda: "" if triton else "triton missing (test)")
    return torch.device(device)


@pytest.mark.parametrize("op,label,column,expected", list(cases()))
def test_resolves_as_the_readme_says(monkeypatch, op, label, column, expected):
    device = _environment(monkeypatch, column)
    impl = re.match(r"`(\w+)`", label).group(1)
    entry = _dispatch.OPS[op]
    monkeypatch.setattr(entry, "warned", False)
    monkeypatch.setattr(entry, "cuda_faster", {torch.float32: True} if "faster" in label else {})
    if expected.endswith("Error"):
        with pytest.raises(ERRORS[expected], match=op):
            _dispatch.resolve(op, impl, device, torch.float32)
        return
    fallback = expected.endswith("(fallback)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _dispatch.resolve(op, impl, device, torch.float32)
    assert got.name == expected.split()[0]
    said = [w for w in caught if "falling back" in str(w.message)]
    assert bool(said) == fallback
    if fallback:  # once per op, saying why
        message = str(said[0].message)
        assert op in message and ("missing (test)" in message or "without its CUDA kernels" in message)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _dispatch.resolve(op, impl, device, torch.float32)


def test_every_public_op_uses_the_one_resolver():
    root = Path(_dispatch.__file__).parent
    for name in ("loss.py", "similarity.py", "optim.py"):
        source = (root / name).read_text()
        assert "_dispatch.resolve(" in source, name
        assert not re.search(r"def _?(resolve\w*|backend\w*)\(", source.replace("def backend(self", "")), name


def test_import_fastclr_leaves_triton_out():
    code = "import sys, fastclr; print('triton' in sys.modules, 'fastclr.triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


def test_triton_is_loaded_when_first_resolved():
    if not ops.triton_available():
        pytest.skip("triton is not installed")
    code = ("import os, sys, torch; os.environ['TRITON_INTERPRET'] = '1'; import fastclr\n"
            "fastclr.nt_xent_fused(torch.randn(4, 3), torch.randn(4, 3), impl='triton')\n"
            "print('fastclr.triton.nt_xent' in sys.modules, hasattr(torch.ops.fastclr, 'nt_xent_triton_forward'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr
