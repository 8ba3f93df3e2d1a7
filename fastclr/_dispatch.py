"""The one backend dispatcher of every public op, and the input checks they share.

Every op declares the backends it has (``OPS``); ``resolve(op, impl, device, dtype)`` picks the
one that runs, by one rule (docs/api.md's dispatch tables, which tests/test_dispatch.py reads):

``resolve`` returns a ``Backend``: its name (for messages, ``LARS.backend()``) and its kernel,
the compiled op that runs it on this device (None for the fallback, which the op file runs
itself: the reference formulation, or LARS's foreach step).

- ``impl="auto"``: CPU tensors -> the C++ kernels ("cpu") when the extension is built. CUDA
  tensors -> the hand-written CUDA kernel where the op's measured table says it beats Triton,
  else Triton, else the CUDA kernel when only it is there. Otherwise the op's fallback (the
  pure-PyTorch "reference", or LARS's "foreach"), with one warning per op that says why.
- an explicit ``impl`` runs that backend or raises an error saying why it cannot. On CPU
  tensors "triton" runs under triton's interpreter (TRITON_INTERPRET=1) and "cuda" on the CUDA
  kernels' CPU harness once the tests have loaded it (``ops.use_cuda_on_cpu``); "auto" never
  picks either.

One vocabulary: "reference" | "cpu" (the C++ kernels) | "triton" | "cuda" | "foreach";
"cpp" is accepted as an alias of "cpu" (LARS's old name). Resolving a backend is also what
imports it: the Triton kernels (and triton itself) are imported the first time "triton" is
considered, never by ``import fastclr``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from fastclr import ops

ALIASES = {"cpp": "cpu"}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass
class Op:
    """A public op's backends. ``kernels``: backend -> the name of its compiled op (in
    ``ops.library(backend, device)``'s namespace); the others run in Python. ``cuda_faster``:
    dtype -> True where the CUDA kernel beat the Triton one, measured forward+backward side by
    side by the GPU suite's benchmark (benchmarks/gpu_suite.sh, then python -m
    benchmarks.import_results prints the comparison); empty until it has run, so "auto" picks
    Triton."""
    name: str
    backends: tuple
    fallback: str
    what: str  # what the fallback is, for its warning
    kernels: dict
    inputs: str = "tensors"  # what the op takes, for error messages
    cuda_faster: dict = field(default_factory=dict)
    warned: bool = False

    @property
    def impls(self) -> tuple:
        return ("auto", *self.backends)


@dataclass(frozen=True)
class Backend:
    """What runs an op: the backend's ``name`` and its ``kernel``, the compiled op for the
    tensors' ``device`` (None for a backend that runs in Python: the reference, LARS's foreach)."""
    name: str
    device: torch.device | None = None
    op_name: str | None = None

    @property
    def kernel(self):
        if self.op_name is None:
            return None
        return getattr(ops.library(self.name, self.device), self.op_name)


_FUSED = ("reference", "cpu", "triton", "cuda")
_LOSS_KERNELS = {"cpu": "nt_xent_forward", "cuda": "nt_xent_forward", "triton": "nt_xent_triton_forward"}
_SIM_KERNELS = {"cpu": "normalized_similarity", "cuda": "normalized_similarity",
                "triton": "normalized_similarity_triton"}
OPS = {
    "nt_xent_fused": Op("nt_xent_fused", _FUSED, "reference", "the reference NT-Xent (O(M^2) memory)",
                        _LOSS_KERNELS),
    "supcon_fused": Op("supcon_fused", _FUSED, "reference", "the reference SupCon (O(M^2) memory)",
                       _LOSS_KERNELS),
    "normalized_similarity": Op("normalized_similarity", _FUSED, "reference",
                                "the reference normalized_similarity (normalised copies of a and b)",
                                _SIM_KERNELS),
    # the CPU has a streaming top-k op; on a GPU the top-k streams over the similarity kernels
    "knn_topk": Op("knn_topk", _FUSED, "reference", "the reference knn_topk (the whole M x K matrix)",
                   {**_SIM_KERNELS, "cpu": "knn_topk"}),
    "LARS": Op("LARS", ("cpu", "cuda", "foreach"), "foreach", "the foreach LARS step (torch._foreach_* ops)",
               {"cpu": "lars_step_", "cuda": "lars_step_"}, inputs="parameters"),
}


def _auto(op: Op, device: torch.device, dtype) -> str | None:
    if device.type == "cpu":
        return "cpu" if "cpu" in op.backends and ops.extension_available() else None
    if device.type != "cuda" or dtype == torch.float64:
        return None
    cuda = "cuda" in op.backends and ops.compiled_with_cuda()
    triton = "triton" in op.backends and ops.triton_available()
    if cuda and (op.cuda_faster.get(dtype, False) or not triton):
        return "cuda"
    return "triton" if triton else None


def _why_not_fused(op: Op, device: torch.device) -> str:
    """Why no compiled backend of ``op`` can run on this device, for the fallback warning."""
    if device.type == "cpu":
        return ops.extension_error()
    if device.type != "cuda":
        return f"no compiled kernel for {device.type} tensors"
    why = []
    if "triton" in op.backends:
        why.append(ops.triton_error())
    if "cuda" in op.backends:
        why.append(ops.extension_error() or "the extension was built without its CUDA kernels")
    return "; ".join(w for w in why if w)


def check_impl(name: str, impl) -> str:
    """``impl`` in the op's vocabulary (aliases resolved), or a ValueError naming the op."""
    backend = ALIASES.get(impl, impl) if isinstance(impl, str) else impl
    if backend not in OPS[name].impls:
        raise ValueError(f"{name}: impl must be one of {OPS[name].impls}, got {impl!r}")
    return backend


def resolve(name: str, impl: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The backend op ``name`` runs for ``impl`` on tensors of this device and dtype, with its
    kernel."""
    op = OPS[name]
    backend = check_impl(name, impl)
    if backend != "auto":
        check_available(op, backend, device, dtype, given=impl)
        return _backend(op, backend, device)
    choice = _auto(op, device, dtype)
    if choice is not None:
        return _backend(op, choice, device)
    if not op.warned:
        op.warned = True
        warnings.warn(f"fastclr: {name}: falling back to {op.what}: {_why_not_fused(op, device)}",
                      RuntimeWarning, stacklevel=3)
    return Backend(op.fallback)


def _backend(op: Op, name: str, device: torch.device) -> Backend:
    return Backend(name, device, op.kernels.get(name))


def check_available(op: Op, backend: str, device: torch.device, dtype, given: str | None = None) -> None:
    """Raises, naming the op and the impl as given, when ``backend`` cannot run on this device
    and dtype."""
    fn, said, things = op.name, given or backend, op.inputs
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{fn}: impl={said!r} needs CPU {things}, got {things} on {device}")
        if not ops.extension_available():
            raise RuntimeError(f"{fn}: impl={said!r} needs the compiled extension: {ops.extension_error()}")
    elif backend == "triton":
        if not ops.triton_available():
            raise RuntimeError(f"{fn}: impl='triton' needs triton: {ops.triton_error()}")
        if device.type == "cpu" and not ops.triton_interpreting():
            raise ValueError(f"{fn}: impl='triton' runs on CUDA tensors, or on CPU tensors when "
                             "TRITON_INTERPRET=1 was set before fastclr was imported; got CPU "
                             "tensors without it")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{fn}: impl='triton' needs CUDA tensors, got tensors on {device}")
        if dtype == torch.float64:
            raise TypeError(f"{fn}: impl='triton' supports float32, bfloat16 and float16, got "
                            "torch.float64 (use impl='cpu' or 'reference')")
    elif backend == "cuda":
        if device.type == "cpu" and ops.cuda_on_cpu():
            pass  # the CUDA kernels on the CPU harness (the tests load it)
        elif device.type != "cuda":
            raise ValueError(f"{fn}: impl='cuda' needs CUDA {things}, got {things} on {device}")
        elif not ops.compiled_with_cuda():
            why = ops.extension_error() or ("fastclr._C was built without its CUDA kernels (no "
                                            "CUDA toolkit at build time, or FASTCLR_CUDA=0)")
            raise RuntimeError(f"{fn}: impl='cuda' needs the compiled CUDA kernels: {why}")
        if dtype == torch.float64:
            raise TypeError(f"{fn}: impl='cuda' supports float32, bfloat16 and float16, got "
                            "torch.float64")


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def check_row_pair(fn: str, names, a, b, *, same_shape: bool) -> None:
    """The input checks every public op shares: two 2-D float tensors (rows, D) of one dtype and
    device, D >= 1, float64 only on CPU; the same shape when ``same_shape``, else the same D.
    Errors name the function and the argument."""
    rows = "(N, D)" if same_shape else "(rows, D)"
    for name, x in zip(names, (a, b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {describe(x)}")
        if x.dim() != 2:
            raise ValueError(f"{fn}: {name} must be 2-D {rows}, got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    (n1, n2) = names
    if same_shape and a.shape != b.shape:
        raise ValueError(f"{fn}: {n1} and {n2} must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: {n1} and {n2} must have the same number of columns D, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{fn}: {n1} and {n2} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{fn}: {n1} and {n2} must be on the same device, got {a.device} and {b.device}")
    if same_shape and (a.shape[0] < 1 or a.shape[1] < 1):
        raise ValueError(f"{fn}: need N >= 1 rows and D >= 1 features, got shape {tuple(a.shape)}")
    if a.shape[1] < 1:
        raise ValueError(f"{fn}: need D >= 1 columns, got shape {tuple(a.shape)}")
    if a.dtype == torch.float64 and a.device.type != "cpu":
        raise TypeError(f"{fn}: float64 is supported on CPU only, got float64 on {a.device}")
