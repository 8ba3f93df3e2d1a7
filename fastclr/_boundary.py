"""The kernel boundary of the loss family, on the Python side.

Every backend's forward op -- ``fastclr::nt_xent_forward`` (C++ and CUDA kernels, csrc/ops.cpp)
and ``fastclr::nt_xent_triton_forward`` -- has one signature: the tensors positional (labels too:
torch's autograd registration takes no keyword-only tensors), every option by keyword::

    forward(z1, z2 | None, temperature, labels=None, *, mean_positives=False,
            compute_accuracy=False, row_lo=0, row_count=-1) -> (row_loss, stats, norm, rank)
    backward(grad_rows, z1, z2 | None, temperature, norm, stats, labels=None, *,
             mean_positives=False, row_lo=0, row_count=-1) -> (grad_z1, grad_z2, grad_temperature)

``KernelOptions`` carries the non-tensor options as one object (the losses build it, the autograd
formula keeps it for the backward). ``check_rows`` is the kernels' own invariants in Python: the
fake kernels and the Triton op run it (the C++ and CUDA kernels share csrc/nt_xent_common.h);
the checks a user sees, naming the public function and argument, are fastclr/loss.py's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelOptions:
    """The loss kernels' options. ``mean_positives``: SupCon's L_out (else the logsumexp form;
    without labels both are NT-Xent); ``compute_accuracy``: also the ranks; ``row_lo`` /
    ``row_count``: the local rows (``local_rows``)."""
    mean_positives: bool = False
    compute_accuracy: bool = False
    row_lo: int = 0
    row_count: int = -1

    @classmethod
    def of(cls, keyword_only_inputs: dict) -> KernelOptions:
        """The options of a forward call's keyword-only inputs (labels aside)."""
        return cls(**{f.name: keyword_only_inputs[f.name] for f in dataclasses.fields(cls)})

    def forward_kwargs(self) -> dict:
        return dataclasses.asdict(self)

    def backward_kwargs(self) -> dict:
        kw = dataclasses.asdict(self)
        del kw["compute_accuracy"]
        return kw


def second_view(z1: torch.Tensor, z2: torch.Tensor | None) -> torch.Tensor:
    """z2, or no rows (labels mode: every row in z1)."""
    return z1[:0] if z2 is None else z2


def check_rows(z1, z2, labels, temperature) -> int:
    """M, the rows of [z1; z2], checked as the kernels check them: paired mode (no labels) needs
    z1, z2 of one shape; labels mode M integer labels; the temperature one element."""
    z2 = second_view(z1, z2)
    torch._check(z1.dim() == 2 and z2.dim() == 2 and z1.shape[1] == z2.shape[1],
                 lambda: "fastclr: z1, z2: 2-D with the same D")
    torch._check(z1.dtype == z2.dtype, lambda: "fastclr: z1 and z2 must share a dtype")
    torch._check(temperature.numel() == 1, lambda: "fastclr: temperature must be a 0-dim tensor")
    m = z1.shape[0] + z2.shape[0]
    if labels is None:
        torch._check(z1.shape == z2.shape, lambda: "fastclr: z1 and z2 must have the same shape "
                                                   "without labels")
    else:
        torch._check(labels.dim() == 1 and labels.shape[0] == m, lambda: f"fastclr: labels must be ({m},)")
        torch._check(not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool),
                     lambda: "fastclr: labels must be an integer tensor")
    return m


def local_rows(row_lo: int, row_count: int, n: int, m: int, paired: bool) -> tuple:
    """(lo, count, span) of local-rows mode (csrc/ops.cpp), checked: the rows i with (i mod span)
    in [lo, lo + count), span = N (paired) or M (labels); row_count = -1: to the end."""
    span = n if paired else m
    count = span - row_lo if row_count < 0 else row_count
    if not (row_lo >= 0 and count >= 0 and row_lo + count <= span):
        raise ValueError(f"fastclr: local rows [{row_lo}, {row_lo} + {count}) must lie within [0, {span})")
    return row_lo, count, span


def local_row_mask(m: int, n: int, paired: bool, row_lo: int, row_count: int, device=None):
    """(M,) mask of the rows that get a loss in local-rows mode (see :func:`local_rows`)."""
    row_lo, count, span = local_rows(row_lo, row_count, n, m, paired)
    i = torch.arange(m, device=device) % span
    return (i >= row_lo) & (i < row_lo + count)
