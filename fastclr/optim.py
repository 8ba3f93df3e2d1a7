"""LARS, exactly as google-research/simclr's (the SimCLR paper's own), and its param groups.

For each parameter w with gradient g (``p.grad`` is never modified):

    if not group["exclude"]:
        g = g + weight_decay * w
        t = trust_coefficient * ||w|| / ||g||   if ||w|| > 0 and ||g|| > 0   else 1
    else:                                        # biases and norm layers
        t = 1
    v = momentum * v + lr * t * g                # v starts at 0
    w = w - v                                    # nesterov: w = w - (momentum * v + lr * t * g)

Norms and math in float32 (bfloat16/float16 parameters are updated through float32); the
momentum buffer is float32. ``step(found_inf=flag)`` (a one-element float32 tensor on the
parameters' device, as GradScaler's ``found_inf``) makes the step change nothing when the flag is
nonzero: the kernels read it on the device, so a training loop can skip a non-finite step without
a host synchronisation. Three implementations of the same step, none synchronising with
the host: "cpu" (one C++ call per group, csrc/lars_cpu.cpp; "cpp" is an alias), "cuda" (multi-tensor CUDA kernels,
kernels/lars.cu) and "foreach" (torch._foreach_* ops, the fallback without the extension).
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import nn

from fastclr import _dispatch
from fastclr._signatures import refuse_positional

IMPLS = (*_dispatch.OPS["LARS"].impls, "cpp")  # "cpp": the old name of "cpu", still taken
_KERNEL_DTYPES = {"cuda": (torch.float32, torch.bfloat16, torch.float16)}  # the compiled steps' dtypes, where not every float
_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def lars_param_groups(model: nn.Module, weight_decay: float = 1e-6) -> list:
    """Two param groups: the weights (LARS-adapted, weight decay ``weight_decay``) and the biases
    and normalisation-layer parameters (``"exclude": True``: no weight decay, no adaptation)."""
    regular, excluded, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (excluded if isinstance(module, _NORM_LAYERS) or name.endswith("bias") else regular).append(p)
    groups = []
    if regular:
        groups.append({"params": regular, "weight_decay": weight_decay, "exclude": False})
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "exclude": True})
    return groups


def _check_hyper(name: str, value, *, positive: bool = False) -> float:
    """A hyper-parameter: a finite number >= 0 (> 0 when ``positive``), or -- as torch.optim
    takes them -- a 0-dim tensor holding one (a CUDA tensor is read on the host at each step)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex():
            raise ValueError(f"LARS: {name} must be a number or a 0-dim tensor, got a tensor of "
                             f"shape {tuple(value.shape)}")
        value = float(value.detach())
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"LARS: {name} must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"LARS: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


_LARS_PEERS = ("lightly's LARS(params, lr, momentum, dampening, weight_decay, nesterov, "
               "trust_coefficient, eps) and timm's Lars(params, lr, momentum, dampening, weight_decay, "
               "nesterov, trust_coeff, ...) put dampening third: write LARS(params, lr, momentum=..., "
               "weight_decay=..., trust_coefficient=...); dampening and eps have no counterpart "
               "(google-research/simclr's LARS, which this is, has neither).")


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with SimCLR's update (see the module docstring).

    Args:
        params: parameters or param groups (e.g. ``lars_param_groups(model)``); a group may set
            ``exclude=True`` and any of the hyper-parameters below.
        lr: learning rate, a number or a 0-dim tensor (may change between steps: set
            ``group["lr"]``, e.g. by a scheduler).
        momentum, weight_decay, trust_coefficient: >= 0; keyword-only, as every option below
            (a positional one is a TypeError saying what lightly's and timm's order means).
        nesterov: Nesterov momentum.
        impl: "auto" (cuda for CUDA parameters, cpu for CPU ones when the extension is built,
            else foreach, with one warning), "cpu" (alias "cpp"), "cuda" or "foreach".
    """

    def __init__(self, params, lr: float, *positional, momentum: float = 0.9, weight_decay: float = 1e-6,
                 trust_coefficient: float = 0.001, nesterov: bool = False, impl: str = "auto"):
        refuse_positional("LARS(params, lr, ...)", positional,
                          "momentum, weight_decay, trust_coefficient, nesterov and impl", _LARS_PEERS)
        _check_hyper("lr", lr)
        defaults = dict(lr=lr, momentum=_check_hyper("momentum", momentum),
                        weight_decay=_check_hyper("weight_decay", weight_decay),
                        trust_coefficient=_check_hyper("trust_coefficient", trust_coefficient),
                        nesterov=bool(nesterov), exclude=False)
        _dispatch.check_impl("LARS", impl)
        self.impl = impl
        self._warned_wd0 = False
        super().__init__(params, defaults)
        for group in self.param_groups:
            for key in ("lr", "momentum", "weight_decay", "trust_coefficient"):
                _check_hyper(key, group[key])

    def add_param_group(self, param_group: dict) -> None:
        # lightly's and timm's LARS exclude a group with weight_decay=0 from the trust ratio; this
        # one (as google-research/simclr's) adapts every group not marked exclude=True. Say so once.
        wd = param_group.get("weight_decay", self.defaults["weight_decay"])
        if "exclude" not in param_group and wd == 0 and not self._warned_wd0:
            self._warned_wd0 = True
            warnings.warn("LARS: a param group has weight_decay=0 and no 'exclude' key: fastclr "
                          "still applies the trust ratio to it (google-research/simclr's rule: only "
                          "exclude=True groups are skipped), while lightly's and timm's LARS would skip "
                          "it. For their behaviour add 'exclude': True to that group (or build the groups "
                          "with fastclr.lars_param_groups(model)).", UserWarning, stacklevel=3)
        super().add_param_group(param_group)

    def backend(self, device: torch.device) -> str:
        """The implementation that steps parameters on ``device`` (fastclr._dispatch)."""
        return _dispatch.resolve("LARS", self.impl, device).name

    @torch.no_grad()
    def step(self, closure=None, *, found_inf: torch.Tensor | None = None):
        """One step; with ``found_inf`` (one float32 element per parameter device, or one tensor
        for all: it is moved where needed) a nonzero value makes it a no-op, decided on the device."""
        if found_inf is not None and (not isinstance(found_inf, torch.Tensor) or found_inf.numel() != 1):
            raise ValueError("LARS.step: found_inf must be a one-element tensor (nonzero: skip the step)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients (the trust ratio "
                                       "needs the full gradient norm); use dense gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32,
                                                                memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            if not params:
                continue
            hyper = dict(lr=float(group["lr"]), momentum=float(group["momentum"]),
                         weight_decay=float(group["weight_decay"]),
                         trust_coefficient=float(group["trust_coefficient"]),
                         nesterov=bool(group["nesterov"]), exclude=bool(group["exclude"]))
            for device, compiled, (ps, gs, bs) in self._calls(params, grads, bufs):
                skip = None if found_inf is None else found_inf.to(device, torch.float32).reshape(1)
                if compiled is None:  # the foreach step
                    _foreach_step(ps, gs, bs, **hyper, skip=skip)
                else:  # one compiled call: the CPU or CUDA kernel, by the dispatcher
                    compiled(ps, gs, bs, **hyper, found_inf=skip)
        return loss

    def _calls(self, params, grads, bufs) -> list:
        """The group's parameters by the call that steps them: ``[(device, kernel or None,
        (params, grads, bufs))]``. The compiled kernels take one dtype per call and parameters
        laid out densely with their buffer's strides (any dense layout, channels-last too); the
        rest -- a strided view, a tensor with gaps -- goes to the foreach step (kernel None) in
        the same step(): the trust ratio is per parameter, so splitting changes nothing. So do
        float64 parameters where the kernel has no float64 path (CUDA's)."""
        backends, calls = {}, {}
        for p, g, b in zip(params, grads, bufs):
            if p.device not in backends:
                backends[p.device] = _dispatch.resolve("LARS", self.impl, p.device)
            kernel = backends[p.device].kernel
            takes = p.dtype in _KERNEL_DTYPES.get(backends[p.device].name, (p.dtype,))
            dense = _dense(p) and b.stride() == p.stride()
            key = (p.device, kernel, p.dtype) if kernel is not None and dense and takes else (p.device, None, None)
            for lst, x in zip(calls.setdefault(key, ([], [], [])), (p, g, b)):
                lst.append(x)
        return [(device, kernel, lists) for (device, kernel, _), lists in calls.items()]


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill its storage span without gaps or overlaps, in some order of
    the dimensions (contiguous, channels-last, a transpose): ATen's is_non_overlapping_and_dense."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _foreach_step(params, grads, bufs, lr, momentum, weight_decay, trust_coefficient, nesterov,
                  exclude, skip=None):
    """The step with torch._foreach_* ops: a handful of multi-tensor launches, no host sync.
    With ``skip`` (one float32 element) the new values are kept only where it is 0 (the fallback
    pays a copy of the parameters and buffers for that; the compiled kernels return early)."""
    if skip is not None:
        old_p, old_b = [p.clone() for p in params], [b.clone() for b in bufs]
        _foreach_step(params, grads, bufs, lr, momentum, weight_decay, trust_coefficient, nesterov,
                      exclude)
        keep = (skip != 0).reshape(())  # 0-dim: a 0-dim parameter (a temperature) stays 0-dim
        for new, old in zip(params + bufs, old_p + old_b):
            new.copy_(torch.where(keep, old, new))
        return
    w32 = [p.float() for p in params]  # float32 math (the parameter itself if float32)
    # d = g + wd w, always a fresh float32 copy: p.grad is never modified.
    if exclude or weight_decay == 0:
        d = torch._foreach_mul([g.float() for g in grads], 1.0)
    else:
        d = torch._foreach_add([g.float() for g in grads], w32, alpha=weight_decay)
    if not exclude:
        w_norm = torch.stack(torch._foreach_norm(w32))
        g_norm = torch.stack(torch._foreach_norm(d))
        ok = (w_norm > 0) & (g_norm > 0)
        trust = torch.where(ok, trust_coefficient * w_norm / torch.where(ok, g_norm, 1.0), 1.0)
        torch._foreach_mul_(d, list((lr * trust).unbind()))
    else:
        torch._foreach_mul_(d, lr)
    # d is now the step lr t g
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    if nesterov:
        torch._foreach_add_(d, bufs, alpha=momentum)
        update = d
    else:
        update = bufs
    if all(p.dtype == torch.float32 for p in params):
        torch._foreach_sub_(params, update)
    else:
        torch._foreach_sub_(w32, update)
        for p, w in zip(params, w32):
            if p.dtype != torch.float32:
                p.copy_(w)
