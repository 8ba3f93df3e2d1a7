"""Loads the compiled extension and registers the fake kernels and autograd of its ops.

This is the one place that imports ``fastclr._C`` and (on first use, ``load_triton``) the Triton
ops. If the extension is missing (not built, or built against another torch) the package still
imports; ``extension_error()`` says why, and the dispatcher (``fastclr._dispatch``) falls back
with one warning.
"""
from __future__ import annotations

import torch

from fastclr._autograd import autograd_formula, similarity_backward, similarity_setup_context
from fastclr._boundary import check_rows, second_view
from fastclr._numerics import accumulation_dtype


def _build_mismatch(record=None) -> str:
    """Why fastclr._C must not be loaded here ('' when it may): the build's record (fastclr/_C.json,
    written by setup.py) names another torch -- loading it could crash the process -- or says
    the extension could not be built."""
    import json
    from pathlib import Path
    try:
        info = json.loads(Path(record or Path(__file__).parent / "_C.json").read_text())
    except (OSError, ValueError):
        return ""
    if "error" in info:
        return info["error"]
    built = info.get("torch", torch.__version__)
    if built != torch.__version__:
        return (f"it was built against torch {built}, but this is torch {torch.__version__}: reinstall "
                "fastclr against this torch (pip install --no-build-isolation --force-reinstall "
                "--no-deps fastclr, or `make build` in a clone)")
    return ""


_C = None
_LOAD_ERROR: Exception | None = None
_MISMATCH = _build_mismatch()
if _MISMATCH:
    _LOAD_ERROR = ImportError(_MISMATCH)
else:
    try:
        from fastclr import _C  # noqa: F401  (importing it registers torch.ops.fastclr.*)
    except ImportError as exc:  # pragma: no cover - exercised only without a build
        _LOAD_ERROR = exc


# The Triton ops (torch.ops.fastclr.*_triton) are registered when fastclr.triton is imported,
# which imports triton (seconds): done on first use, by the dispatcher, never by `import fastclr`.
_triton_modules: tuple | None = None
_TRITON_ERROR: Exception | None = None


def load_triton() -> bool:
    """Imports the Triton kernels (registering their ops) once; True when that worked."""
    global _triton_modules, _TRITON_ERROR
    if _triton_modules is None and _TRITON_ERROR is None:
        try:  # needs triton, not a GPU
            from fastclr.triton import nt_xent, similarity
        except ImportError as exc:  # pragma: no cover - exercised only without triton
            _TRITON_ERROR = exc
        else:
            _triton_modules = (nt_xent, similarity)
    return _triton_modules is not None


def triton_available() -> bool:
    return load_triton()


def triton_error() -> str:
    """Why the Triton kernels are unavailable ('' when they are)."""
    load_triton()
    return "" if _TRITON_ERROR is None else f"triton could not be imported ({_TRITON_ERROR})"


def triton_interpreting() -> bool:
    """True when the Triton kernels were defined under TRITON_INTERPRET=1 (CPU tensors)."""
    return load_triton() and _triton_modules[0].INTERPRETED


def extension_available() -> bool:
    return _C is not None


def extension_error() -> str:
    """Why the compiled extension could not be loaded ('' when it was)."""
    if _LOAD_ERROR is None:
        return ""
    return (f"fastclr._C could not be loaded ({_LOAD_ERROR}); without it the reference and the "
            "Triton kernels run. Build it with a C++ compiler present: `pip install "
            "--no-build-isolation .` (FASTCLR_EXT=1 makes a failed build an error) or `make build`")


def compiled_with_cuda() -> bool:
    return _C is not None and _C.compiled_with_cuda()


def nt_xent_forward_fake(z1, z2, temperature, labels=None, *, mean_positives=False,
                         compute_accuracy=False, row_lo=0, row_count=-1):
    """The fake (meta) kernel of every backend's forward: (row_loss[M], stats[4, M], norm[M],
    rank[2, M] or rank[0])."""
    m = check_rows(z1, z2, labels, temperature)
    rows = z1.new_empty((m,), dtype=accumulation_dtype(z1.dtype))
    rank = z1.new_empty((2, m) if compute_accuracy else (0,), dtype=torch.int32)
    return rows, rows.new_empty((4, m)), torch.empty_like(rows), rank


def nt_xent_backward_fake(grad_rows, z1, z2, temperature, norm, stats, labels=None, *,
                          mean_positives=False, row_lo=0, row_count=-1):
    m = check_rows(z1, z2, labels, temperature)
    torch._check(grad_rows.shape == (m,), lambda: "grad_rows: (M,)")
    return (torch.empty_like(z1), torch.empty_like(second_view(z1, z2)),
            temperature.new_empty((), dtype=accumulation_dtype(z1.dtype)))


def _register_library(lib: str) -> None:
    """The fake kernels and autograd formulas of the compiled ops of namespace ``lib``: fastclr's
    own, or the CPU harness's of the CUDA kernels (the same schemas, see ``use_cuda_on_cpu``)."""
    ops = getattr(torch.ops, lib)

    torch.library.register_fake(f"{lib}::nt_xent_forward", nt_xent_forward_fake)
    torch.library.register_fake(f"{lib}::nt_xent_backward", nt_xent_backward_fake)
    _backward, _setup_context = autograd_formula(ops.nt_xent_backward)
    torch.library.register_autograd(f"{lib}::nt_xent_forward", _backward,
                                    setup_context=_setup_context)

    @torch.library.register_fake(f"{lib}::normalized_similarity")
    def _normalized_similarity_fake(a, b):
        torch._check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1],
                     lambda: "a (M, D), b (K, D)")
        return a.new_empty((a.shape[0], b.shape[0]), dtype=accumulation_dtype(a.dtype))

    @torch.library.register_fake(f"{lib}::knn_topk")
    def _knn_topk_fake(queries, bank, *, k, chunk):
        torch._check(queries.dim() == 2 and bank.dim() == 2 and queries.shape[1] == bank.shape[1],
                     lambda: "queries (M, D), bank (K, D)")
        vals = queries.new_empty((queries.shape[0], k), dtype=accumulation_dtype(queries.dtype))
        return vals, queries.new_empty((queries.shape[0], k), dtype=torch.long)

    torch.library.register_autograd(f"{lib}::normalized_similarity", similarity_backward,
                                    setup_context=similarity_setup_context)


if _C is not None:
    _register_library("fastclr")


# The CUDA kernels executed on the CPU (tests/cuda_on_cpu/ builds them): kernels/*.cu compiled by
# the host compiler against an execution runtime, registered for CPU tensors as
# torch.ops.fastclr_cuda_on_cpu.*. Loaded only by the tests; then impl="cuda" takes CPU tensors.
CUDA_ON_CPU_LIB = "fastclr_cuda_on_cpu"
_cuda_on_cpu = False


def use_cuda_on_cpu(library_path: str) -> None:
    """Loads the CPU harness's op library (once): impl="cuda" then runs CPU tensors through it."""
    global _cuda_on_cpu
    if not _cuda_on_cpu:
        torch.ops.load_library(library_path)
        _register_library(CUDA_ON_CPU_LIB)
        _cuda_on_cpu = True


def cuda_on_cpu() -> bool:
    """True when the CUDA kernels' CPU harness is loaded (see ``use_cuda_on_cpu``)."""
    return _cuda_on_cpu


def library(backend: str, device: torch.device):
    """The namespace of compiled ops that runs ``backend`` on ``device``: torch.ops.fastclr (its
    C++ and CUDA kernels, by device), or the harness's for the CUDA kernels on CPU tensors."""
    if backend == "cuda" and device.type == "cpu":
        return getattr(torch.ops, CUDA_ON_CPU_LIB)
    return torch.ops.fastclr
