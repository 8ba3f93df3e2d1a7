"""The process's runtime: the device and torch.distributed set-up, and what SIGTERM / SIGINT do.

``setup_distributed`` picks the device and, under torchrun, joins the process group (NCCL on
GPUs, gloo on CPU); ``fast_paths`` what ``--precision auto`` and ``--channels-last auto`` mean on
it (bf16 autocast and channels-last on a GPU, and on a CPU with native bf16 dot products).
``StopRequest`` lets a signal ask the training loop to save and stop at its next look at the
device; ``exit_on_signal`` makes a signal end a stretch of work that cannot
stop half-way (an evaluation) with one message and exit status 128 + signal.
"""
from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist


def setup_distributed(device_arg: str):
    """(device, rank, world_size); initialises torch.distributed under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    if device_arg.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    device = torch.device(f"cuda:{local_rank}" if device_arg == "cuda" else device_arg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=attempt_store(world),
                                rank=rank, world_size=world)
    return device, rank, world


# Values of FASTCLR_CPU_CAPABILITY / ATEN_CPU_CAPABILITY below AVX-512, and of oneDNN's
# ONEDNN_MAX_CPU_ISA without AVX-512 or AMX in them: an AVX2 machine being emulated.
_BELOW_AVX512 = ("default", "avx2", "sse", "sse41", "sse42", "avx")
CPU_FAST_PATH_NOTE = ("training on the CPU's fast paths (bf16 autocast and/or channels-last): a run "
                      "resumed from a checkpoint is not bit-identical to an uninterrupted one; "
                      "--deterministic (with --precision and --channels-last auto) trains in fp32, "
                      "contiguous, and resumes exactly")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as torch reports it,
    and nothing caps the instruction set below AVX-512: FASTCLR_CPU_CAPABILITY or torch's
    ATEN_CPU_CAPABILITY at avx2 or less, or oneDNN's ONEDNN_MAX_CPU_ISA without AVX512/AMX, say
    an AVX2 machine is being emulated (where bf16 runs an order of magnitude slower than fp32)."""
    for name in ("FASTCLR_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"):
        if os.environ.get(name, "").strip().lower() in _BELOW_AVX512:
            return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and "AVX512" not in isa and "AMX" not in isa and isa != "ALL":
        return False
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def fast_paths(precision: str, channels_last: str, device: torch.device, *, deterministic: bool = False,
               native_bf16=None) -> tuple:
    """``(autocast dtype or None, channels_last)`` for the flags' values: "auto" is bf16 and
    channels-last on a GPU, and on a CPU with native bf16 (``native_bf16``, default
    cpu_has_native_bf16()) unless ``deterministic``; fp32 and contiguous on other CPUs. An explicit
    value is taken as given."""
    fast = device.type == "cuda" or (not deterministic and (
        cpu_has_native_bf16() if native_bf16 is None else native_bf16))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(
        precision, torch.bfloat16 if fast else None)
    return dtype, channels_last == "on" or (channels_last == "auto" and fast)


def attempt_store(world: int):
    """torchrun's agent serves one store for all restarts of the workers, so a restarted attempt
    would find the keys of the failed one (gloo then connects to a dead worker's address, NCCL
    reads a stale id): each attempt gets its own prefix. None (env://) outside torchrun."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from torch.distributed.constants import default_pg_timeout  # what env:// would wait
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=False, timeout=default_pg_timeout)
    return dist.PrefixStore(f"fastclr/attempt_{attempt}/", store)


class _SignalHandler:
    """While entered, this object handles SIGTERM and SIGINT; the previous handlers come back
    on exit."""

    def __enter__(self):
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


class StopRequest(_SignalHandler):
    """While entered, SIGTERM / SIGINT set ``signum``; the loop reads it every --log-every steps,
    then saves and stops."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        self.signum = signum


class exit_on_signal(_SignalHandler):
    """While entered, SIGTERM / SIGINT print what happened (``what``) and exit 128 + signal."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, signum, frame):
        print(f"stopped by {signal.Signals(signum).name} {self.what}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)
