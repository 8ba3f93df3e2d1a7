"""``nt_xent_fused`` and ``NTXentLoss``: input checks, backend dispatch, reductions."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from fastclr import _dispatch, distributed, reference
from fastclr._dispatch import check_row_pair, describe as _describe

IMPLS = _dispatch.OPS["nt_xent_fused"].impls
REDUCTIONS = ("mean", "sum", "none")


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
    backend = _dispatch.resolve("nt_xent_fused", impl, z1.device, z1.dtype)
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
        _dispatch.check_impl("nt_xent_fused", impl)
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
