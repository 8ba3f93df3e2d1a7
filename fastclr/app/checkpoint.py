"""Checkpoint I/O and atomic writes: every file a run leaves is written whole or not at all.

A checkpoint is ``torch.save`` of a dict ``{"format", "config" (RunConfig.to_dict()), "model",
"optimizer", "rng", "run" (the loop's RunState), "scaler"}``, read back only with
``weights_only=True`` (tensors and plain data: loading one never runs code from the file).
"""
from __future__ import annotations

import io
import os

import torch

from .config import RUN_DEFINING, SCHEDULE, RunConfig

CKPT_FORMAT = "fastclr-checkpoint-2"


def atomic_write(path: str, payload) -> None:
    """Write ``payload`` (bytes, or a function of a binary file) to a temporary file beside
    ``path``, fsync it, rename it over ``path``, fsync the folder: a crash at any point leaves
    the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            payload(f) if callable(payload) else f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(out: str, program: str, hint: str) -> None:
    """Refuse, before any work, an output folder that cannot be made or written: one probe file
    written (atomically, so nothing is left when it fails) and removed. ``hint``: what to do
    instead (``give another --out``)."""
    probe = os.path.join(out, f".fastclr-write-test.{os.getpid()}")
    try:
        atomic_write(probe, b"0")  # makes the folder
        os.unlink(probe)
    except OSError as exc:
        raise SystemExit(f"{program}: cannot write to the output folder {out}: "
                         f"{exc.strerror or exc}; {hint}") from None


def checkpoint_bytes(state: dict) -> bytes:
    """``torch.save(state)`` in memory: the file's size is known before it is written, and a
    failed write is the file system's OSError, not torch's "unexpected pos"."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save(state)`` to ``path``, atomically."""
    atomic_write(path, checkpoint_bytes(state))


def write_or_exit(what: str, path: str, write, *, size: int | None = None, ckpt_path: str,
                  last_good: str | None):
    """``write()``; if the file system refuses it (no space, no permission, a read-only folder),
    the run ends with exit status 1 and one message: what could not be written and why, the
    space it needed, the last good checkpoint (``ckpt_path``, where the run stood then:
    ``last_good``, None if none was written) and how to continue. The writes are atomic, so
    nothing partial or temporary is left."""
    try:
        return write()
    except OSError as exc:
        why = exc.strerror or str(exc)
        need = f" ({size / 2**20:.1f} MiB needed)" if size else ""
        if last_good:
            then = (f"The last good checkpoint is {ckpt_path}, {last_good}: once {what} can be "
                    "written there (free space, or fix the folder), the same command with --resume "
                    "auto continues from it.")
        else:
            then = "No checkpoint has been written yet: rerun once the folder can be written."
        raise SystemExit(f"fastclr.train: could not write {what} {path}: {why}{need}. {then}") from None


def read_checkpoint(path: str, what: str = "--resume") -> dict:
    """The checkpoint's contents; a file that is not one is refused (messages start with ``what``),
    never loaded unsafely."""
    if not os.path.isfile(path):
        raise SystemExit(f"{what}: no checkpoint at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
        raise SystemExit(f"{what}: {path} is not a checkpoint (not a file torch.save wrote)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the same thing here
        # torch's safe unpickler names a class or function it refused (GLOBAL ..., allowlisted via
        # add_safe_globals); any other failure, "Unsupported operand" included, is a damaged file.
        unsafe = "GLOBAL" in str(exc) or "allowlisted" in str(exc)
        raise SystemExit(
            f"{what}: {path} holds objects other than tensors and plain data, so it is not a fastclr "
            "checkpoint (fastclr never unpickles those: that could run code from the file)" if unsafe
            else f"{what}: cannot read checkpoint {path} (truncated or corrupt: "
                 f"{type(exc).__name__})") from None
    if not isinstance(state, dict) or not str(state.get("format", "")).startswith("fastclr-checkpoint"):
        raise SystemExit(f"{what}: {path} is not a fastclr training checkpoint ({CKPT_FORMAT})")
    if state["format"] != CKPT_FORMAT:
        raise SystemExit(f"{what}: {path} was written by another version of fastclr "
                         f"({state['format']}; this one reads {CKPT_FORMAT})"
                         + ("; start a new run" if what == "--resume" else ""))
    return state


def config_of(ckpt: dict, path: str, what: str) -> RunConfig:
    """The run configuration a checkpoint records."""
    try:
        return RunConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"{what}: {path}: {exc}") from None


def load_run(path: str, what: str = "fastclr.evaluate") -> tuple:
    """(checkpoint contents, its RunConfig, its path) of a run folder or a checkpoint file;
    anything else is refused with a message naming what was wrong."""
    if os.path.isdir(path):
        ckpt = os.path.join(path, "checkpoint.pt")
        if not os.path.isfile(ckpt):
            raise SystemExit(f"{what}: {path} is not a fastclr run folder (it has no checkpoint.pt)")
        path = ckpt
    elif not os.path.exists(path):
        raise SystemExit(f"{what}: {path} does not exist (give a run folder or its checkpoint.pt)")
    ckpt = read_checkpoint(path, what)
    return ckpt, config_of(ckpt, path, what), path


def num_classes_of(ckpt: dict, config: RunConfig, fallback: int) -> int:
    """The supervised baseline's classifier width, from its weights (else ``fallback``)."""
    head = ckpt["model"].get("head.weight")
    return int(head.shape[0]) if config.loss == "supervised" and head is not None else fallback


def model_of(ckpt: dict, config: RunConfig, *, random_init: bool, num_classes: int,
             program: str = "fastclr.evaluate"):
    """The run's model with its trained weights (loaded strictly), or at a seeded random
    initialisation."""
    torch.manual_seed(config.seed)
    try:
        model = config.build_model(num_classes_of(ckpt, config, num_classes))
        if not random_init:
            model.load_state_dict(ckpt["model"])
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"{program}: the checkpoint's model cannot be rebuilt here: {exc}") from None
    return model


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_same_run(path: str, theirs: RunConfig, ours: RunConfig, *, epoch: int, step: int,
                   steps_per_epoch: int) -> None:
    """Refuse to resume, from ``path`` at (``epoch``, ``step``), a run that differs in what
    defines it (``RUN_DEFINING``) or in its learning-rate schedule (``SCHEDULE``)."""
    diff = [f"--{k.replace('_', '-')} {getattr(theirs, k)!r} there, {getattr(ours, k)!r} here"
            for k in RUN_DEFINING if getattr(theirs, k) != getattr(ours, k)]
    if diff:
        raise SystemExit(f"--resume: {path} belongs to a different run: " + "; ".join(diff))
    changed = [k for k in SCHEDULE if getattr(theirs, k) != getattr(ours, k)]
    if not changed:
        return
    was = ", ".join(f"--{k.replace('_', '-')} {getattr(theirs, k)}" for k in SCHEDULE)
    if epoch >= theirs.epochs:
        raise SystemExit(
            f"--resume: {path} is a finished run ({was}): its learning rate has decayed to 0 on its "
            f"cosine schedule, and resuming with {', '.join(changed)} changed would jump it back up. "
            "To train longer, start a new run with the new --epochs (another --out)")
    old, new = theirs.lr_factor(step, steps_per_epoch), ours.lr_factor(step, steps_per_epoch)
    raise SystemExit(
        f"--resume: {path} was trained with {was}, which fix the learning-rate schedule; with the "
        f"new values the lr would jump from {old:.3g} to {new:.3g} x peak at step {step}. "
        "Resume with the old values, or start a new run")
