"""``nt_xent_fused`` and ``NTXentLoss``: input checks, backend dispatch, reductions."""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from fastclr import distributed, ops, reference

IMPLS = ("auto", "reference", "cpu", "triton", "cuda")
REDUCTIONS = ("mean", "sum", "none")
_HALF = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_warned_fallback = False


def _describe(x) -> str:
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
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {_describe(x)}")
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


def _check_embeddings(z1, z2) -> None:
    check_row_pair("nt_xent_fused", ("z1", "z2"), z1, z2, same_shape=True)


def min_temperature(dtype: torch.dtype) -> float:
    """The smallest temperature the kernels take in accumulation dtype ``dtype``: below it the
    scaled logits s / tau * log2(e) (|s| <= 1) overflow."""
    return 2.0 / torch.finfo(dtype).max


def check_temperature(fn: str, value: float, dtype: torch.dtype = torch.float32) -> float:
    """A host-side temperature: finite, > 0, and 1/temperature representable in ``dtype``."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{fn}: temperature must be finite and > 0, got {value}")
    if value < min_temperature(dtype):
        raise ValueError(f"{fn}: temperature {value:g} is too small: 1/temperature overflows "
                         f"{str(dtype).replace('torch.', '')} (need >= {min_temperature(dtype):.3g})")
    return float(value)


def _temperature_tensor(temperature, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The temperature as a 0-dim ``dtype`` tensor on ``device``, checked: a float on the host; a
    CPU tensor on the host in eager code; a CUDA tensor, or any tensor under torch.compile /
    CUDA graphs, by a device-side assert (no host sync per step, and no check skipped)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError("nt_xent_fused: temperature must be a float or a 0-dim tensor, got "
                             f"shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"nt_xent_fused: temperature tensor must be floating point, got "
                            f"{temperature.dtype}")
        t = temperature.to(device=device, dtype=dtype)
        if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
            check_temperature("nt_xent_fused", float(temperature.detach()), dtype)
        else:
            bound = min_temperature(dtype)
            torch._assert_async((t >= bound) & (t < math.inf),
                                f"nt_xent_fused: temperature must be finite and >= {bound:.3g} "
                                "(> 0, with 1/temperature finite)")
        return t
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"nt_xent_fused: temperature must be a float or a 0-dim tensor, got "
                        f"{_describe(temperature)}")
    value = check_temperature("nt_xent_fused", float(temperature), dtype)
    # torch.full launches a fill on the device; torch.tensor would copy from the host and sync.
    return torch.full((), value, dtype=dtype, device=device)


def check_impl_available(fn: str, impl: str, device: torch.device, dtype: torch.dtype | None) -> None:
    """Raises, naming ``fn``, when the explicitly requested backend ``impl`` ("cpu", "triton",
    "cuda") cannot run on tensors of this device and dtype. Shared by the loss and the similarity
    functions."""
    if impl == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{fn}: impl='cpu' needs CPU tensors, got tensors on {device}")
        if not ops.extension_available():
            raise RuntimeError(f"{fn}: impl='cpu' needs the compiled extension: {ops.extension_error()}")
    elif impl == "triton":
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
    elif impl == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{fn}: impl='cuda' needs CUDA tensors, got tensors on {device}")
        if not ops.compiled_with_cuda():
            why = ops.extension_error() or ("fastclr._C was built without its CUDA kernels (no "
                                            "CUDA toolkit at build time, or FASTCLR_CUDA=0)")
            raise RuntimeError(f"{fn}: impl='cuda' needs the compiled CUDA kernels: {why}")
        if dtype == torch.float64:
            raise TypeError(f"{fn}: impl='cuda' supports float32, bfloat16 and float16, got "
                            "torch.float64")


# Where the hand-written CUDA kernel beat the Triton one, measured fwd+bwd side by side by
# `python -m benchmarks.bench_loss --device cuda --impls fused cuda` (gpu_suite.sh): dtype ->
# True. Empty until that benchmark has run on a GPU: until then "auto" picks Triton.
CUDA_FASTER_THAN_TRITON: dict = {}


def _cuda_kernel_is_faster(dtype: torch.dtype | None) -> bool:
    return bool(CUDA_FASTER_THAN_TRITON.get(dtype, False))


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run: see DESIGN.md, Dispatch."""
    global _warned_fallback
    if impl not in IMPLS:
        raise ValueError(f"nt_xent_fused: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        check_impl_available("nt_xent_fused", impl, device, dtype)
        return impl
    # auto
    if device.type == "cpu" and ops.extension_available():
        return "cpu"
    if device.type == "cuda" and dtype != torch.float64:
        if ops.compiled_with_cuda() and _cuda_kernel_is_faster(dtype):
            return "cuda"
        if ops.triton_available():
            return "triton"
        if ops.compiled_with_cuda():
            return "cuda"
    if not _warned_fallback:
        _warned_fallback = True
        if device.type == "cpu":
            why = ops.extension_error()
        elif device.type == "cuda":
            why = f"{ops.triton_error()}; {ops.extension_error() or 'the extension has no CUDA kernels'}"
        else:
            why = f"no fused kernel for {device.type} tensors"
        warnings.warn(f"fastclr: falling back to the reference NT-Xent (O(M^2) memory): {why}",
                      RuntimeWarning, stacklevel=3)
    return "reference"


# The compiled ops serve CPU and CUDA tensors alike (the dispatcher picks the kernel).
_FORWARD_OPS = {"cpu": "nt_xent_forward", "cuda": "nt_xent_forward",
                "triton": "nt_xent_triton_forward"}


def nt_xent_fused(z1: torch.Tensor, z2: torch.Tensor, temperature=0.5, *, impl: str = "auto",
                  reduction: str = "mean", return_accuracy: bool = False, process_group=None):
    """NT-Xent (SimCLR's contrastive loss) with the normalisation fused in.

    Rows ``z1[i]`` and ``z2[i]`` are the two views of image ``i``; every other row of
    ``[z1; z2]`` is a negative. loss_i = logsumexp_{j != i}(u_i . u_j / tau) - u_i . u_{p(i)} / tau
    with u = z / max(||z||, 1e-12). The fused paths never build the 2N x 2N matrix.

    Args:
        z1, z2: (N, D) tensors, same shape, dtype (float32, bfloat16, float16; float64 on
            CPU) and device.
        temperature: a float > 0, or a 0-dim tensor (its gradient flows if it requires grad);
            1/temperature must be finite in the accumulation dtype (see ``min_temperature``).
        impl: "auto" | "reference" | "cpu" | "triton" | "cuda".
        reduction: "mean" | "sum" | "none" (the 2N per-row losses).
        return_accuracy: also return ``{"top1", "top5", "contrast_acc"}``, computed in the same
            pass: top-k, the fraction of the 2N rows whose positive is outranked by fewer than k
            of the 2N - 2 other rows; contrast_acc, google-research/simclr's metric, the fraction
            of view 1's rows whose positive has the highest of the N cross-view logits.
        process_group: in multi-process training (``torch.distributed`` initialised), the group
            whose ranks' rows form the global batch (``torch.distributed.group.WORLD`` for all).
            Every rank's pairs are gathered, so all of them are negatives for every row; the
            result is this rank's share: "mean" is the mean of this rank's 2N rows against the
            global batch (its mean over ranks is the single-process loss), "sum" their sum,
            "none" those 2N rows. Gradients, averaged over ranks by DDP, equal the
            single-process gradients (see fastclr.distributed). Accuracy is the global batch's.
            Ignored when not distributed.

    Returns:
        The loss (float32 for half inputs, the input dtype otherwise), or ``(loss, accuracy)``.
    """
    _check_embeddings(z1, z2)
    _check_process_group("nt_xent_fused", process_group)
    if reduction not in REDUCTIONS:
        raise ValueError(f"nt_xent_fused: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if process_group is not None and distributed.is_distributed(process_group):
        n, d = z1.shape
        # both views in one collective (and one shape check): [z1 | z2] side by side
        g1, g2 = distributed.all_gather_with_grad(torch.cat([z1, z2], dim=1), process_group).split(d, dim=1)
        out = nt_xent_fused(g1, g2, temperature, impl=impl, reduction="none",
                            return_accuracy=return_accuracy)
        rows, acc = out if return_accuracy else (out, None)
        loss = reference.reduce_rows(distributed.local_rows(rows, n, process_group), reduction)
        return (loss, acc) if return_accuracy else loss
    acc_dtype = reference.accumulation_dtype(z1.dtype)
    t = _temperature_tensor(temperature, acc_dtype, z1.device)
    backend = _resolve_impl(impl, z1.device, z1.dtype)
    if backend == "reference":
        return reference.nt_xent(z1, z2, t, reduction=reduction, return_accuracy=return_accuracy)
    forward = getattr(torch.ops.fastclr, _FORWARD_OPS[backend])
    rows, _, _, rank = forward(z1, z2, t, bool(return_accuracy))
    loss = reference.reduce_rows(rows, reduction)
    if not return_accuracy:
        return loss
    return loss, reference.accuracy_from_rank(rank)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_fused`.

    ``temperature`` is a float > 0 or a 0-dim tensor (kept as given, so a tensor that requires
    grad stays in the graph); it can be set later (``criterion.temperature = 0.2``). With
    ``learnable_temperature=True`` it is a parameter, stored as its log so it stays positive
    (``self.log_temperature``), initialised at ``temperature``. ``process_group`` (or lightly's
    ``gather_distributed=True``, meaning the WORLD group) gathers the global batch across
    processes, as :func:`nt_xent_fused`'s ``process_group``.
    """

    def __init__(self, temperature=0.5, learnable_temperature: bool = False,
                 impl: str = "auto", reduction: str = "mean", process_group=None,
                 gather_distributed: bool = False):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"NTXentLoss: impl must be one of {IMPLS}, got {impl!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"NTXentLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        _check_process_group("NTXentLoss", process_group)
        if gather_distributed and process_group is not None:
            raise ValueError("NTXentLoss: pass process_group or gather_distributed=True, not both")
        self.impl = impl
        self.reduction = reduction
        self.process_group = process_group
        self.gather_distributed = bool(gather_distributed)
        self.learnable_temperature = learnable_temperature
        if learnable_temperature:
            value = _module_temperature(temperature)
            self.log_temperature = nn.Parameter(torch.tensor(math.log(float(value))))
        else:
            self._temperature = _module_temperature(temperature)

    @property
    def temperature(self):
        if self.learnable_temperature:
            return self.log_temperature.exp()
        return self._temperature

    @temperature.setter
    def temperature(self, value):
        value = _module_temperature(value)
        if self.learnable_temperature:
            with torch.no_grad():
                self.log_temperature.fill_(math.log(float(value)))
        else:
            self._temperature = value

    def _group(self):
        if self.process_group is None and self.gather_distributed and distributed.is_distributed():
            return torch.distributed.group.WORLD
        return self.process_group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, return_accuracy: bool = False):
        return nt_xent_fused(z1, z2, self.temperature, impl=self.impl, reduction=self.reduction,
                             return_accuracy=return_accuracy, process_group=self._group())

    def extra_repr(self) -> str:
        t = "learnable" if self.learnable_temperature else self._temperature
        if isinstance(t, torch.Tensor):
            t = f"tensor({float(t.detach()):g})"
        return f"temperature={t}, impl={self.impl!r}, reduction={self.reduction!r}"


def _module_temperature(value):
    """A module's temperature: a float > 0 (checked here) or a 0-dim floating tensor (checked on
    every call, as nt_xent_fused checks it)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"NTXentLoss: temperature must be a float or a 0-dim floating tensor, "
                            f"got {_describe(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"NTXentLoss: temperature must be a float or a 0-dim tensor, got "
                        f"{_describe(value)}")
    return check_temperature("NTXentLoss", float(value))


def _check_process_group(fn: str, group) -> None:
    if group is None:
        return
    if not (torch.distributed.is_available() and isinstance(group, torch.distributed.ProcessGroup)):
        raise TypeError(f"{fn}: process_group must be a torch.distributed.ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD) or None, got {_describe(group)}")
