"""``nt_xent_fused`` / ``NTXentLoss`` and ``supcon_fused`` / ``SupConLoss``: input checks,
backend dispatch, reductions. Both run the same kernels (``fastclr::nt_xent_forward`` and its
Triton twin): NT-Xent is the member of the family whose positives are the pairs (i, i + N)."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from typing import NamedTuple

from fastclr import _dispatch, _numerics, distributed, reference
from fastclr._boundary import KernelOptions, local_row_mask
from fastclr._dispatch import check_row_pair, describe as _describe
from fastclr._signatures import refuse_positional

IMPLS = _dispatch.OPS["nt_xent_fused"].impls


class LossWithAccuracy(NamedTuple):
    """What a loss returns with ``return_accuracy=True``: ``loss, acc = ...`` still unpacks it."""
    loss: torch.Tensor
    accuracy: dict
REDUCTIONS = ("mean", "sum", "none")
POSITIVES = ("mean", "sum")


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


def _temperature_tensor(temperature, dtype: torch.dtype, device: torch.device,
                        fn: str = "nt_xent_fused") -> torch.Tensor:
    """The temperature as a 0-dim ``dtype`` tensor on ``device``, checked: a float on the host; a
    CPU tensor on the host in eager code; a CUDA tensor, or any tensor under torch.compile /
    CUDA graphs, by a device-side assert (no host sync per step, and no check skipped)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"{fn}: temperature must be a float or a 0-dim tensor, got "
                             f"shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"{fn}: temperature tensor must be floating point, got "
                            f"{temperature.dtype}")
        t = temperature.to(device=device, dtype=dtype)
        if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
            check_temperature(fn, float(temperature.detach()), dtype)
        else:
            bound = min_temperature(dtype)
            torch._assert_async((t >= bound) & (t < math.inf),
                                f"{fn}: temperature must be finite and >= {bound:.3g} "
                                "(> 0, with 1/temperature finite)")
        return t
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"{fn}: temperature must be a float or a 0-dim tensor, got "
                        f"{_describe(temperature)}")
    value = check_temperature(fn, float(temperature), dtype)
    # torch.full launches a fill on the device; torch.tensor would copy from the host and sync.
    return torch.full((), value, dtype=dtype, device=device)


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
        The loss (float32 for half inputs, the input dtype otherwise), or with
        ``return_accuracy`` a ``LossWithAccuracy(loss, accuracy)`` (a named tuple: ``loss, acc =``).
    """
    _check_embeddings(z1, z2)
    _check_process_group("nt_xent_fused", process_group)
    if reduction not in REDUCTIONS:
        raise ValueError(f"nt_xent_fused: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    group = process_group if distributed.is_distributed(process_group) else None
    n, d = z1.shape
    lo = 0
    if group is not None:
        # both views in one collective (and one shape check): [z1 | z2] side by side
        z1, z2 = distributed.all_gather_with_grad(torch.cat([z1, z2], dim=1), group).split(d, dim=1)
        lo = torch.distributed.get_rank(group) * n
    t = _temperature_tensor(temperature, _numerics.accumulation_dtype(z1.dtype), z1.device)
    kernel = _dispatch.resolve("nt_xent_fused", impl, z1.device, z1.dtype).kernel
    if kernel is None:  # the reference
        if group is None:
            out = reference.nt_xent(z1, z2, t, reduction=reduction, return_accuracy=return_accuracy)
            return LossWithAccuracy(*out) if return_accuracy else out
        rows = reference.nt_xent(z1, z2, t, reduction="none")
        rank = reference.positive_rank(reference.similarity_logits(z1, z2, t)) if return_accuracy else None
    else:
        # paired positives (no labels; with one positive per row both forms are NT-Xent), the
        # loss of this rank's rows only (its share of both views), against every gathered row
        options = KernelOptions(compute_accuracy=bool(return_accuracy), row_lo=lo, row_count=n)
        rows, _, _, rank = kernel(z1, z2, t, **options.forward_kwargs())
    mine = distributed.local_rows(rows, n, group) if group is not None else rows
    loss = _numerics.reduce_rows(mine, reduction)
    if not return_accuracy:
        return loss
    # the global batch's accuracies: this rank's rows' counts, summed over the ranks
    hits = _numerics.pair_hits(rank, local_row_mask(rank.shape[1], z1.shape[0], True, lo, n, rank.device))
    if group is not None:
        torch.distributed.all_reduce(hits, group=group)
    return LossWithAccuracy(loss, _numerics.accuracy_from_hits(hits))


def _check_labels(fn: str, labels, z: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{fn}: labels must be a torch.Tensor of integers, got {_describe(labels)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{fn}: labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
        raise ValueError(f"{fn}: labels must be 1-D with one label per row of z ({z.shape[0]},), "
                         f"got shape {tuple(labels.shape)}")
    if labels.device != z.device:
        raise ValueError(f"{fn}: labels must be on z's device {z.device}, got {labels.device}")


def supcon_fused(z: torch.Tensor, labels: torch.Tensor, temperature=0.1, *,
                 positives: str = "mean", impl: str = "auto", reduction: str = "mean",
                 return_accuracy: bool = False, process_group=None):
    """Supervised contrastive loss (Khosla et al. 2020) and multi-view SimCLR, fused.

    Rows of equal label are positives of each other: P(i) = {j != i : labels_j = labels_i};
    the denominator runs over every j != i (positives included), u = z / max(||z||, 1e-12),
    s_ij = u_i . u_j / tau. The fused paths never build the M x M matrix.

    - ``positives="mean"`` (SupCon's L_out; the official SupContrast code and
      pytorch-metric-learning's ``SupConLoss``): loss_i = logsumexp_{j != i} s_ij - mean_{p in P(i)} s_ip.
    - ``positives="sum"`` (L_in; solo-learn's and VISSL's multi-positive SimCLR):
      loss_i = logsumexp_{j != i} s_ij - logsumexp_{p in P(i)} s_ip.

    V views of N images stacked as ``z = torch.cat(views)`` with ``labels = torch.arange(N).repeat(V)``
    are multi-view SimCLR; for V = 2 both forms equal ``nt_xent_fused(z1, z2)``.

    Args:
        z: (M, D) float32, bfloat16, float16 (float64 on CPU).
        labels: (M,) integer tensor on z's device.
        temperature: a float > 0, or a 0-dim tensor (its gradient flows if it requires grad).
        positives: "mean" | "sum".
        impl: "auto" | "reference" | "cpu" | "triton" | "cuda".
        reduction: "mean" over the rows that have a positive (a batch without any gives a 0
            that back-propagates zero gradients) | "sum" | "none" (M rows; 0 for a row without
            a positive).
        return_accuracy: also return ``{"top1", "top5"}``: the fraction of rows with a positive
            whose best positive is outranked by fewer than k negatives. Labels' positives are
            known only after a full sweep, so the fused kernels then sweep the columns twice.
        process_group: in multi-process training, the group whose ranks' rows (and labels) form
            the global batch; this rank's share of the loss ("mean": W times its rows' sum over
            the global count of rows with a positive, so that the mean over ranks is the
            single-process loss, and DDP-averaged gradients equal the single-process ones).

    Returns:
        The loss (float32 for half inputs, the input dtype otherwise), or with
        ``return_accuracy`` a ``LossWithAccuracy(loss, accuracy)`` (a named tuple: ``loss, acc =``).
    """
    fn = "supcon_fused"
    check_row_pair(fn, ("z", "z"), z, z, same_shape=True)
    _check_labels(fn, labels, z)
    _check_process_group(fn, process_group)
    if positives not in POSITIVES:
        raise ValueError(f"{fn}: positives must be one of {POSITIVES}, got {positives!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    group = process_group if distributed.is_distributed(process_group) else None
    m_local, lo = z.shape[0], 0
    if group is not None:
        lo = torch.distributed.get_rank(group) * m_local
        z = distributed.all_gather_with_grad(z, group)
        labels = distributed.all_gather_with_grad(labels, group)
    rows, count, rank = _supcon_rows(z, labels, temperature, positives, impl, return_accuracy,
                                     lo, m_local)
    mine, has = rows.narrow(0, lo, m_local), count.narrow(0, lo, m_local) > 0
    # "mean": over the rows with a positive of the global batch; W times this rank's share, so
    # that the mean over ranks is the single-process loss
    totals = (_numerics.supcon_hits(rank[:, lo:lo + m_local], count.narrow(0, lo, m_local))
              if return_accuracy else has.sum().float()[None])
    if group is not None and (reduction == "mean" or return_accuracy):
        torch.distributed.all_reduce(totals, group=group)
    world = 1 if group is None else torch.distributed.get_world_size(group)
    if reduction == "mean":
        loss = mine.sum() * world / totals[0].clamp_min(1)
    else:
        loss = _numerics.reduce_rows(mine, reduction)
    if not return_accuracy:
        return loss
    return LossWithAccuracy(loss, _numerics.supcon_accuracy_from_hits(totals))


def _supcon_rows(z, labels, temperature, positives, impl, return_accuracy, lo, count):
    """(per-row losses, |P(i)| per row, ranks or None) of the batch, the losses and ranks valid
    for the rows lo .. lo + count (the fused kernels compute only those)."""
    t = _temperature_tensor(temperature, _numerics.accumulation_dtype(z.dtype), z.device,
                            "supcon_fused")
    kernel = _dispatch.resolve("supcon_fused", impl, z.device, z.dtype).kernel
    if kernel is None:  # the reference
        rows = reference.supcon(z, labels, t, positives, reduction="none")
        rank = reference.supcon_rank(z, labels, t) if return_accuracy else None
        same = labels[:, None] == labels[None, :]
        return rows, same.sum(1) - 1, rank
    options = KernelOptions(mean_positives=positives == "mean", compute_accuracy=bool(return_accuracy),
                            row_lo=lo, row_count=count)
    rows, stats, _, rank = kernel(z, None, t, labels=labels, **options.forward_kwargs())  # all rows in z1
    return rows, stats[3], rank


_NTXENT_KEYWORDS = "learnable_temperature, impl, reduction, process_group and gather_distributed"
_NTXENT_PEERS = ("lightly's NTXentLoss(temperature, memory_bank_size, gather_distributed) has the "
                 "memory bank's size second: fastclr's NTXentLoss has no memory bank; lightly's "
                 "gather_distributed=True is the same keyword here. Before 0.2.0 the second argument "
                 "was learnable_temperature: write learnable_temperature=True.")
_SUPCON_KEYWORDS = "positives, learnable_temperature, impl, reduction and process_group"


class _TemperatureModule(nn.Module):
    """A loss module's temperature: a float > 0 or a 0-dim tensor (kept as given, so a tensor
    that requires grad stays in the graph), settable later (``criterion.temperature = 0.2``);
    with ``learnable_temperature=True`` a parameter stored as its log (``self.log_temperature``)
    so it stays positive, initialised at ``temperature``."""

    def __init__(self, temperature, learnable_temperature: bool):
        super().__init__()
        self.learnable_temperature = learnable_temperature
        if learnable_temperature:
            value = _module_temperature(temperature, type(self).__name__)
            self.log_temperature = nn.Parameter(torch.tensor(math.log(float(value))))
        else:
            self._temperature = _module_temperature(temperature, type(self).__name__)

    @property
    def temperature(self):
        if self.learnable_temperature:
            return self.log_temperature.exp()
        return self._temperature

    @temperature.setter
    def temperature(self, value):
        value = _module_temperature(value, type(self).__name__)
        if self.learnable_temperature:
            with torch.no_grad():
                self.log_temperature.fill_(math.log(float(value)))
        else:
            self._temperature = value

    def _temperature_repr(self) -> str:
        t = "learnable" if self.learnable_temperature else self._temperature
        if isinstance(t, torch.Tensor):
            t = f"tensor({float(t.detach()):g})"
        return f"temperature={t}"


class NTXentLoss(_TemperatureModule):
    """Module form of :func:`nt_xent_fused`.

    ``temperature``: see ``_TemperatureModule`` (a float, a 0-dim tensor, or with
    ``learnable_temperature=True`` a parameter, ``self.log_temperature``). ``process_group`` (or
    lightly's ``gather_distributed=True``, meaning the WORLD group) gathers the global batch
    across processes, as :func:`nt_xent_fused`'s ``process_group``.
    """

    def __init__(self, temperature=0.5, *positional, learnable_temperature: bool = False,
                 impl: str = "auto", reduction: str = "mean", process_group=None,
                 gather_distributed: bool = False):
        refuse_positional("NTXentLoss(temperature, ...)", positional, _NTXENT_KEYWORDS, _NTXENT_PEERS)
        _dispatch.check_impl("nt_xent_fused", impl)
        if reduction not in REDUCTIONS:
            raise ValueError(f"NTXentLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        _check_process_group("NTXentLoss", process_group)
        if gather_distributed and process_group is not None:
            raise ValueError("NTXentLoss: pass process_group or gather_distributed=True, not both")
        super().__init__(temperature, learnable_temperature)
        self.impl = impl
        self.reduction = reduction
        self.process_group = process_group
        self.gather_distributed = bool(gather_distributed)

    def _group(self):
        if self.process_group is None and self.gather_distributed and distributed.is_distributed():
            return torch.distributed.group.WORLD
        return self.process_group

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, *positional, return_accuracy: bool = False):
        refuse_positional("NTXentLoss.forward(z1, z2)", positional, "return_accuracy")
        return nt_xent_fused(z1, z2, self.temperature, impl=self.impl, reduction=self.reduction,
                             return_accuracy=return_accuracy, process_group=self._group())

    def extra_repr(self) -> str:
        return f"{self._temperature_repr()}, impl={self.impl!r}, reduction={self.reduction!r}"


class SupConLoss(_TemperatureModule):
    """Module form of :func:`supcon_fused`: ``criterion(z, labels)``, as pytorch-metric-learning's
    ``SupConLoss(temperature)(embeddings, labels)``. ``temperature`` as :class:`NTXentLoss`'s."""

    def __init__(self, temperature=0.1, *positional, positives: str = "mean",
                 learnable_temperature: bool = False, impl: str = "auto",
                 reduction: str = "mean", process_group=None):
        refuse_positional("SupConLoss(temperature, ...)", positional, _SUPCON_KEYWORDS,
                          "Before 0.2.0 the second argument was positives: write positives='mean' or 'sum'.")
        _dispatch.check_impl("supcon_fused", impl)
        if positives not in POSITIVES:
            raise ValueError(f"SupConLoss: positives must be one of {POSITIVES}, got {positives!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"SupConLoss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        _check_process_group("SupConLoss", process_group)
        super().__init__(temperature, learnable_temperature)
        self.positives = positives
        self.impl = impl
        self.reduction = reduction
        self.process_group = process_group

    def forward(self, z: torch.Tensor, labels: torch.Tensor, *positional, return_accuracy: bool = False):
        refuse_positional("SupConLoss.forward(z, labels)", positional, "return_accuracy",
                          "pytorch-metric-learning's third argument, indices_tuple (a miner's pairs), has "
                          "no counterpart: fastclr's SupCon uses every pair of the batch.")
        return supcon_fused(z, labels, self.temperature, positives=self.positives, impl=self.impl,
                            reduction=self.reduction, return_accuracy=return_accuracy,
                            process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"{self._temperature_repr()}, positives={self.positives!r}, impl={self.impl!r}, "
                f"reduction={self.reduction!r}")


def _module_temperature(value, fn: str = "NTXentLoss"):
    """A module's temperature: a float > 0 (checked here) or a 0-dim floating tensor (checked on
    every call, as the functions check it)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise TypeError(f"{fn}: temperature must be a float or a 0-dim floating tensor, "
                            f"got {_describe(value)}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: temperature must be a float or a 0-dim tensor, got "
                        f"{_describe(value)}")
    return check_temperature(fn, float(value))


def _check_process_group(fn: str, group) -> None:
    if group is None:
        return
    if not (torch.distributed.is_available() and isinstance(group, torch.distributed.ProcessGroup)):
        raise TypeError(f"{fn}: process_group must be a torch.distributed.ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD) or None, got {_describe(group)}")
