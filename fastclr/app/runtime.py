"""The process's runtime: the device and torch.distributed set-up, and what SIGTERM / SIGINT do.

``setup_distributed`` picks the device and, under torchrun, joins the process group (NCCL on
GPUs, gloo on CPU). ``StopRequest`` lets a signal ask the training loop to save and stop at its
next look at the device; ``exit_on_signal`` makes a signal end a stretch of work that cannot
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
