"""``python -m fastclr.train``: SimCLR pretraining, then kNN and linear-probe evaluation.

With no arguments it trains a small ResNet-18 on scikit-learn's bundled handwritten digits (no
download) for a few minutes on a CPU and prints, as its last line, one JSON object with the
results. Every flag can also come from a YAML file (``--config FILE.yaml``, keys named as the
flags; flags on the command line override it; ``--config NAME`` takes a shipped recipe,
fastclr/app/configs/NAME.yaml, from any folder; ``config.shipped_configs()`` lists them); the resolved
configuration is printed at the start and saved as <out>/config.yaml.

Losses: NT-Xent (SimCLR), multi-view SimCLR (``--views V``: V augmented views per image, every
other view of the same image a positive) and supervised contrastive pretraining (``--loss
supcon``: images of the same class are positives; ``--positives mean|sum``).

A batch larger than the encoder's activations fit: ``--micro-batch B`` embeds B images (with
their views) at a time and still computes the loss on the whole batch, with its exact
gradients (gradient caching, fastclr.grad_cache; BatchNorm statistics are then per micro-batch).

Several GPUs or machines: ``torchrun --nproc-per-node K -m fastclr.train ...`` (DDP; NCCL on GPUs,
gloo on CPU). --batch-size is the global batch; each rank takes an equal share, the loss sees the
whole global batch (fastclr.distributed), and gradients equal the single-process ones.

The step never waits for the host: a non-finite loss or gradient skips the update on the device
(LARS reads the flag), and the host reads the loss sums and the stop flags every --log-every
steps and at the end of each epoch. Checkpoints (<out>/checkpoint.pt) are written atomically
every --ckpt-every epochs (and --ckpt-every-steps steps), at the end, and on SIGTERM / SIGINT
(honoured within --log-every steps; exit status 128 + signal). ``--resume`` continues a run
exactly where it stopped, mid-epoch included.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from fastclr import __version__
from fastclr.grad_cache import grad_cache_backward
from fastclr.loss import nt_xent_fused, supcon_fused
from fastclr.optim import LARS, lars_param_groups

from . import checkpoint as ckpt_io
from . import data as data_mod
from . import dali, eval_run, metrics, models, runtime
from .augment import TorchSimCLRAugment
from .config import RunConfig, parse_args
from .runtime import StopRequest, exit_on_signal, setup_distributed
from .state import EpochSums, RunState, Stop

PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 with loss scaling"}


# --- the run's state --------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop works with, set up once by ``setup_run``."""
    config: RunConfig
    device: torch.device
    rank: int
    world: int
    ds: object
    batches: object
    model: torch.nn.Module         # the module trained (DDP-wrapped with several processes)
    raw_model: models.SimCLRModel  # the module saved
    forward: object                # model, or its torch.compile
    optimizer: torch.optim.Optimizer  # fastclr.LARS, or torch's fused SGD / AdamW
    augment: object
    amp_dtype: torch.dtype | None
    channels_last: bool
    group: object
    state: RunState
    sums: metrics.DeviceSums
    writer: object
    ckpt_path: str
    stop_request: StopRequest
    last_good: str | None = None  # where the last checkpoint written (or resumed from) stands
    scaler: torch.amp.GradScaler | None = None  # --precision fp16's loss scale
    eval_ds: object = None  # what evaluation reads (on the main process): ds, or --val-dir's

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def lr_at(self, step: int) -> float:
        return self.config.peak_lr * self.config.lr_factor(step, self.steps_per_epoch)

    @property
    def where(self) -> str:
        """Where the run is now, as every message says it."""
        return self.state.position(self.steps_per_epoch, self.config.epochs)

    def write_or_exit(self, what: str, path: str, write, size: int | None = None):
        """``write()``, or the run ends with one message naming the last good checkpoint
        (checkpoint.write_or_exit)."""
        return ckpt_io.write_or_exit(what, path, write, size=size, ckpt_path=self.ckpt_path,
                                     last_good=self.last_good)


class TorchViews:
    """Per-step views from the torch augmentation, seeded by (seed, step, rank), so a resumed
    run draws exactly what an uninterrupted one does. ``cropped``: the batches hold the views
    already cropped from the originals, (V, b, 3, S, S) (an image folder's, cropped in the
    loader workers); the rest of the augmentation is drawn per view here."""

    def __init__(self, config: RunConfig, mean, std, device, dtype, channels_last, rank, *,
                 cropped: bool = False):
        self.t = TorchSimCLRAugment(config.image_size, strength=config.strength, mean=mean,
                                    std=std, dtype=dtype, channels_last=channels_last,
                                    scale=(config.crop_scale, 1.0), flip=config.flip, crop=not cropped)
        self.gen = torch.Generator(device=device)
        self.seed, self.rank, self.device, self.views = config.seed, rank, device, config.views
        self.cropped = cropped

    def __call__(self, x, step):
        self.gen.manual_seed(((self.seed * 1_000_003 + step) * 1009 + self.rank) & (2**63 - 1))
        x = x.to(self.device, non_blocking=True)
        if self.cropped:  # the V views of each image as one batch, every view drawn apart
            return self.t(x.flatten(0, 1), generator=self.gen, views=1)[0].chunk(self.views)
        return self.t(x, generator=self.gen, views=self.views)


# --- set-up -----------------------------------------------------------------------------------

def _load_data(config: RunConfig, device, rank, world, amp_dtype, channels_last):
    """(dataset, training batches, the augmentation the loop applies or None for DALI)."""
    gpu = device.type == "cuda"
    use_dali = config.augment == "dali" or (config.augment == "auto" and gpu and dali.dali_available())
    if use_dali and not dali.dali_available():
        raise SystemExit("--augment dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    if config.batch_size % world:
        raise SystemExit(f"--batch-size {config.batch_size} must be a multiple of the {world} processes")
    dali_kw = None
    if use_dali:
        dali_kw = dict(device="gpu" if gpu else "cpu", strength=config.strength, views=config.views,
                       dtype=amp_dtype or torch.float32, channels_last=channels_last,
                       scale=(config.crop_scale, 1.0), flip=config.flip)
    try:
        ds = data_mod.load_dataset(config.dataset, config.data_dir, synthetic_size=config.synthetic_size,
                                   synthetic_image_size=config.image_size, validation=config.validation)
        files = dict(views=config.views, scale=(config.crop_scale, 1.0), max_bad=config.max_bad_files,
                     report=metrics.BadFileLog(config.out) if rank == 0 else None)
        batches = data_mod.train_batches(ds, config.batch_size, seed=config.seed, rank=rank,
                                         world_size=world, workers=config.workers,
                                         size=config.image_size, dali=dali_kw, files=files)
    except (ValueError, FileNotFoundError) as exc:  # bad data or flags: a message, not a traceback
        raise SystemExit(f"fastclr.train: {exc}") from exc
    views = None if use_dali else TorchViews(config, ds.mean, ds.std, device, amp_dtype or torch.float32,
                                             channels_last, rank, cropped=getattr(batches, "cropped", False))
    return ds, batches, views


def _build_model(config: RunConfig, device, channels_last, num_classes):
    try:
        model = config.build_model(num_classes).to(device)
    except ValueError as exc:  # a backbone that cannot take these views: a message
        raise SystemExit(f"fastclr.train: {exc}") from None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, make_optimizer(config, model, config.peak_lr)


def make_optimizer(config: RunConfig, model, lr: float):
    """--optimizer over lars_param_groups (no weight decay on biases and norms, for all three):
    fastclr.LARS, or torch's fused SGD / AdamW, which skip a step on the device when
    ``optimizer.found_inf`` is set (optimizer_step)."""
    groups = lars_param_groups(model, config.weight_decay)
    if config.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=config.momentum, trust_coefficient=config.trust_coefficient,
                    impl=config.optimizer_impl)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def optimizer_step(optimizer, found_inf: torch.Tensor) -> None:
    """The step, skipped on the device (no host synchronisation) where ``found_inf`` is nonzero."""
    if isinstance(optimizer, LARS):
        optimizer.step(found_inf=found_inf)
    else:
        optimizer.found_inf = found_inf.reshape(())  # what GradScaler hands the fused optimizers
        optimizer.step()


def setup_run(config: RunConfig, device, rank, world) -> Run:
    torch.manual_seed(config.seed)
    gpu = device.type == "cuda"
    amp_dtype, channels_last = runtime.fast_paths(config.precision, config.channels_last, device,
                                                  deterministic=config.deterministic)
    if not gpu and rank == 0 and (amp_dtype is not None or channels_last):
        print(f"fastclr.train: {runtime.CPU_FAST_PATH_NOTE}", file=sys.stderr, flush=True)
    ds, batches, views = _load_data(config, device, rank, world, amp_dtype, channels_last)
    model, optimizer = _build_model(config, device, channels_last, ds.num_classes)
    ckpt_path = os.path.join(config.out, "checkpoint.pt")
    resume = config.resume
    if resume == "auto":
        resume = ckpt_path if os.path.isfile(ckpt_path) else None
    state = RunState()
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    if resume:
        restore(resume, config, model, optimizer, state, len(batches), scaler, batches)
    raw_model = model
    if world > 1 and gpu:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if gpu else None)
    run = Run(config, device, rank, world, ds, batches, model, raw_model,
              torch.compile(model) if config.compile else model, optimizer, views, amp_dtype,
              channels_last, dist.group.WORLD if world > 1 else None, state,
              metrics.DeviceSums(device, state.bad_run), None, ckpt_path, StopRequest(), scaler=scaler)
    if resume and os.path.abspath(resume) == os.path.abspath(ckpt_path):
        run.last_good = run.where
    if run.main:
        run.eval_ds = eval_run.evaluation_data(ds, config, config.val_dir, "fastclr.train")
        _open_outputs(run, resumed=bool(resume))
    if config.eval_random_init and run.main and state.random_init is None:
        state.random_init = headline(run_evaluation(run, probe=True))
    return run


def _open_outputs(run: Run, *, resumed: bool) -> None:
    import yaml
    from torch.utils.tensorboard import SummaryWriter
    config = run.config
    os.makedirs(config.out, exist_ok=True)
    text = yaml.safe_dump(config.to_dict(), sort_keys=True)
    path = os.path.join(config.out, "config.yaml")
    run.write_or_exit("the configuration", path, lambda: ckpt_io.atomic_write(path, text.encode()))
    run.writer = SummaryWriter(os.path.join(config.out, "tensorboard"), purge_step=run.state.step)
    if hasattr(run.batches, "ds"):  # an image folder: the file list the run trains on
        run.write_or_exit("the file list", metrics.files_list(config.out),
                          lambda: metrics.write_file_list(config.out, run.batches.ds.files))
    kind = {"ntxent": "SimCLR" if config.views == 2 else f"multi-view SimCLR ({config.views} views)",
            "supcon": f"SupCon ({config.views} views, positives {config.positives})",
            "supervised": f"supervised cross-entropy baseline ({config.views} views)"}[config.loss]
    optimizer = (f"LARS impl {run.optimizer.backend(run.device)}" if config.optimizer == "lars"
                 else config.optimizer)
    print(f"fastclr {__version__}: {kind} on {config.dataset} ({run.steps_per_epoch} "
          f"steps/epoch of {config.batch_size} images, {config.epochs} epochs), {config.backbone}"
          + (f" width {config.width}" if config.width else "")
          + f", {run.world} process(es) on {run.device}, loss impl {config.loss_impl}, {optimizer}, "
          f"augmentation {'DALI' if run.augment is None else 'torch'}, {PRECISION_NAMES[run.amp_dtype]}; "
          f"out {config.out}" + (f"; resumed {run.where}"
                               if resumed else ""), flush=True)
    print("configuration (saved as config.yaml):\n  " + text.strip().replace("\n", "\n  "), flush=True)


# --- one step ---------------------------------------------------------------------------------

def contrastive_loss(run: Run, z: torch.Tensor, labels: torch.Tensor, views: int):
    """(loss, top-1) of one step's embeddings ``z`` (the ``views`` views stacked)."""
    config = run.config
    kw = dict(impl=config.loss_impl, return_accuracy=True, process_group=run.group)
    if config.loss == "ntxent" and views == 2:
        z1, z2 = z.chunk(2)
        loss, acc = nt_xent_fused(z1, z2, config.temperature, **kw)
        return loss, acc["top1"]
    n = z.shape[0] // views
    if config.loss == "supervised":  # z: the classifier's logits for every view
        target = labels.to(run.device, non_blocking=True).repeat(views)
        loss = torch.nn.functional.cross_entropy(z, target)
        return loss, (z.detach().argmax(1) == target).float().mean()
    if config.loss == "supcon":
        ids = labels.to(run.device, non_blocking=True)
    else:  # multi-view SimCLR: an image's views share a label unique in the global batch
        ids = torch.arange(n, device=run.device) + run.rank * n
    loss, acc = supcon_fused(z, ids.repeat(views), config.temperature, positives=config.positives, **kw)
    return loss, acc["top1"]


def nonfinite_flag(loss: torch.Tensor, params, group) -> torch.Tensor:
    """One float32 element on the device: 1 if the loss or any gradient is not finite (on any
    rank), else 0. No host synchronisation (the all-reduce is queued on the device's stream)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.stack(torch._foreach_norm(grads)).sum() + loss.detach().float()
    found = (~torch.isfinite(total)).float()
    if group is not None:
        dist.all_reduce(found, op=dist.ReduceOp.MAX, group=group)
    return found.reshape(1)


def train_step(run: Run, x, labels) -> None:
    """Forward, loss, backward, and the LARS step -- skipped on the device if anything is not
    finite. Nothing here waits for the device."""
    step = run.state.step
    views = x if run.augment is None else run.augment(x, step)
    for group in run.optimizer.param_groups:
        group["lr"] = run.lr_at(step)
    run.optimizer.zero_grad(set_to_none=True)
    loss, top1 = forward_backward(run, tuple(views), labels)
    if run.scaler is not None:  # fp16: the gradients of the scaled loss, divided back on the device
        run.scaler.unscale_(run.optimizer)
    found = nonfinite_flag(loss, run.raw_model.parameters(), run.group)
    optimizer_step(run.optimizer, found)
    if run.scaler is not None:  # back off after an overflow, grow after a run of good steps
        run.scaler.update()
    run.sums.add(loss, top1, found)


def forward_backward(run: Run, views: tuple, labels):
    """The step's gradients and its detached (loss, top-1): the encoder under autocast, the
    loss in float32; with --micro-batch through gradient caching (fastclr.grad_cache)."""
    def loss_fn(z):
        with torch.autocast(run.device.type, enabled=False):
            loss, top1 = contrastive_loss(run, z.float(), labels, len(views))
        if run.scaler is None:
            return loss, top1
        return run.scaler.scale(loss), top1, loss.detach()  # backward through the scaled loss
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        micro = run.config.micro_batch or views[0].shape[0]
        out = grad_cache_backward(run.forward, views, loss_fn, micro)
    return (out[2], out[1]) if run.scaler is not None else out


# --- the loop ---------------------------------------------------------------------------------

def read_progress(run: Run, bar, clock: list) -> Stop | None:
    """The host's look at the device (one synchronisation): fold the sums into the state, log,
    and say whether to stop (a signal on any rank, or too many non-finite steps in a row)."""
    st, c = run.state, run.state.current
    files = getattr(run.batches, "counts", tuple)()  # an image folder's files read and found bad
    loss, top1, good, bad, bad_run, signum, files = run.sums.read(run.stop_request.signum, run.group, files)
    c.loss, c.top1, c.good_steps = c.loss + loss, c.top1 + top1, c.good_steps + good
    st.bad_steps, st.bad_run = st.bad_steps + bad, bad_run
    now = time.perf_counter()
    c.seconds, st.train_time, clock[0] = c.seconds + now - clock[0], st.train_time + now - clock[0], now
    if run.main and good:
        lr = run.lr_at(st.step - 1)
        bar.set_postfix(loss=f"{loss / good:.4f}", lr=f"{lr:.3g}",
                        img_s=f"{st.batch * run.config.batch_size / max(c.seconds, 1e-9):.0f}")
        run.writer.add_scalar("train/loss", loss / good, st.step)
        run.writer.add_scalar("train/lr", lr, st.step)
    if st.bad_run >= run.config.max_bad_steps:
        return Stop("bad_steps")
    too_many = run.batches.over_limit(*files) if files else None
    if too_many:
        return Stop("bad_files", message=too_many)
    return Stop("signal", signum) if signum else None


def run_epoch(run: Run) -> Stop | None:
    """Batches ``state.batch..`` of epoch ``state.epoch``; reads the device every --log-every
    steps (checkpointing every --ckpt-every-steps) and at the end. Returns a Stop or None."""
    st, config = run.state, run.config
    bar = tqdm(total=run.steps_per_epoch, initial=st.batch, unit="step", file=sys.stderr,
               desc=f"epoch {st.epoch + 1}/{config.epochs}", dynamic_ncols=True,
               disable=not run.main or config.no_progress)
    clock = [time.perf_counter()]
    try:
        for x, labels in run.batches.epoch(st.epoch, st.batch):
            train_step(run, x, labels)
            st.step, st.batch = st.step + 1, st.batch + 1
            bar.update(1)
            if st.batch == run.steps_per_epoch:
                break
            ckpt_now = config.ckpt_every_steps and st.step % config.ckpt_every_steps == 0
            if st.step % config.log_every == 0 or ckpt_now:
                stop = read_progress(run, bar, clock)
                if stop:
                    return stop
                if ckpt_now:
                    checkpoint(run)
        return read_progress(run, bar, clock)
    finally:
        bar.close()


def end_epoch(run: Run) -> None:
    """The epoch's row of metrics (and kNN every --eval-every epochs), checkpoint if due."""
    st, config, c = run.state, run.config, run.state.current
    row = {"epoch": st.epoch + 1, "step": st.step, "loss": c.loss / max(c.good_steps, 1),
           "contrastive_top1": c.top1 / max(c.good_steps, 1), "lr": run.lr_at(st.step),
           "images_per_sec": run.steps_per_epoch * config.batch_size / c.seconds if c.seconds > 0 else None,
           "bad_steps": st.bad_steps, "elapsed_s": st.train_time}
    st.epoch, st.batch, st.current = st.epoch + 1, 0, EpochSums()
    last = st.epoch == config.epochs
    if run.main and config.eval_every and st.epoch % config.eval_every == 0 and not last:
        row["knn_top1"] = run_evaluation(run, probe=False).get("knn", {}).get("top1")
    st.history.append(row)
    if run.main:
        save_metrics(run)
        for k in ("loss", "contrastive_top1", "images_per_sec", "knn_top1"):
            if row.get(k) is not None:
                run.writer.add_scalar(f"epoch/{k}", row[k], row["epoch"])
    if st.epoch % config.ckpt_every == 0 or last or (
            config.ckpt_every_steps and st.step % config.ckpt_every_steps == 0):
        checkpoint(run)


def train(run: Run) -> Stop:
    """Epochs until the last one or a stop; a stopped run is checkpointed where it stopped."""
    with run.stop_request:
        while run.state.epoch < run.config.epochs:
            stop = run_epoch(run)
            if stop is None or run.state.batch == run.steps_per_epoch:
                end_epoch(run)
            if stop:
                checkpoint(run)
                return stop
    return Stop("done")


def finish(run: Run, stop: Stop) -> dict | None:
    """Exit with a message on a stop; else the final evaluation, the outputs and the JSON line."""
    st = run.state
    where = run.where
    if stop.reason != "done":
        if stop.reason == "bad_steps":
            code, msg = 3, (f"stopping: {st.bad_run} steps in a row had a non-finite loss "
                            f"({st.bad_steps} in all), {where}; checkpoint {run.ckpt_path}. Lower "
                            "--base-lr or raise --temperature, then --resume")
        elif stop.reason == "bad_files":
            code, msg = 1, (f"stopping {where}: {stop.message}; checkpoint {run.ckpt_path} (--resume "
                            "with a higher --max-bad-files continues)")
        else:
            code, msg = 128 + stop.signum, (
                f"stopped by {signal.Signals(stop.signum).name} {where}; checkpoint {run.ckpt_path}; "
                f"continue with --resume {run.ckpt_path}")
        if run.main:
            print(msg, file=sys.stderr, flush=True)
        raise SystemExit(code)
    result = None
    if run.main:
        with exit_on_signal(f"during the final evaluation (training is complete and saved in "
                             f"{run.ckpt_path}); --resume {run.ckpt_path} redoes the evaluation"):
            final = final_evaluation(run)
        for protocol, why in final.get("skipped", {}).items():  # unlabeled data
            print(f"fastclr.train: evaluation: skipped {protocol}: {why}", file=sys.stderr)
        if getattr(run.batches, "report", None) is not None:  # bad files the evaluation met too
            run.batches.report.write(run.batches.ds)
        result = _write_results(run, headline(final))
        print(json.dumps(result), flush=True)
    if run.world > 1:
        dist.barrier()
    return result


def _write_results(run: Run, final: dict) -> dict:
    config, st = run.config, run.state
    if st.history:
        st.history[-1]["knn_top1"] = final.get("knn_top1")
        save_metrics(run)
    for name, value in final.items():
        run.writer.add_scalar(f"eval/{name}", value, st.step)
    run.writer.close()
    path = os.path.join(config.out, "curves.png")
    run.write_or_exit("the curves", path, lambda: metrics.plot_curves(path, st.history, final))
    result = {
        **final,
        "images_per_sec": (st.step * config.batch_size / st.train_time) if st.train_time > 0 else None,
        "epochs": config.epochs, "steps": st.step, "checkpoint": os.path.abspath(run.ckpt_path),
        "final_loss": st.history[-1]["loss"] if st.history else None, "bad_steps": st.bad_steps,
        "train_time_s": st.train_time, "dataset": config.dataset, "backbone": config.backbone,
        "width": config.width, "batch_size": config.batch_size, "loss": config.loss, "views": config.views,
        "world_size": run.world, "device": str(run.device), "out": os.path.abspath(config.out),
    }
    if st.random_init is not None:
        result["random_init"] = st.random_init
    return result


def main(argv=None) -> dict | None:
    config = parse_args(argv, description=__doc__)
    device, rank, world = setup_distributed(config.device)
    try:
        if rank == 0:
            ckpt_io.check_output_folder(config.out, "fastclr.train", "give another --out")
        run = setup_run(config, device, rank, world)
        try:
            return finish(run, train(run))
        finally:
            if run.writer is not None:
                run.writer.flush()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- evaluation -------------------------------------------------------------------------------

def run_evaluation(run: Run, *, probe: bool, plots: eval_run.Plots | None = None) -> dict:
    """kNN (and, with ``probe``, the linear probe) of the backbone's features, by the protocols
    of ``python -m fastclr.evaluate`` (eval_run.evaluate_model), without its sweeps."""
    s = eval_run.settings_of(run.config, progress=False)
    return eval_run.evaluate_model(run.raw_model, run.eval_ds, run.config, s, ("knn", "linear") if probe else ("knn",),
                                   run.device, plots=plots, sweep=False, dtype=run.amp_dtype,
                                   channels_last=run.channels_last, workers=run.config.workers)


def final_evaluation(run: Run) -> dict:
    """The end of training's evaluation, written as python -m fastclr.evaluate writes its own:
    <out>/eval.json, eval.md and the linear probe's confusion plot (a refused write: write_or_exit)."""
    config, path = run.config, os.path.join(run.config.out, "eval.json")
    return eval_run.evaluate_into(
        config.out, "eval", lambda plots: run_evaluation(run, probe=True, plots=plots),
        lambda results: eval_run.make_report(config, run.state.state_dict(), run.ckpt_path, run.eval_ds,
                                             eval_run.settings_of(config), results, ("knn", "linear")),
        guard=lambda write: run.write_or_exit("the evaluation results", path, write))["results"]


def headline(results: dict) -> dict:
    """The evaluation's figures as the JSON line names them: knn_top1, knn_top5, linear_top1, ...
    (for unlabeled data: alignment, uniformity)."""
    out = {f"{p}_{k}": results[p][k] for p in ("knn", "linear") if p in results for k in ("top1", "top5")}
    return {**out, **results.get("embedding", {})}


# --- checkpoints and outputs -------------------------------------------------------------------

def checkpoint(run: Run) -> None:
    if run.world > 1 and hasattr(run.batches, "ds"):  # every rank's bad files, in checkpoint and list
        found = [None] * run.world
        dist.all_gather_object(found, run.batches.ds.bad, group=run.group)
        for bad in found:
            run.batches.ds.bad.update(bad)
        if run.main and run.batches.report is not None:
            run.batches.report.write(run.batches.ds)
    if run.main:
        data = ckpt_io.checkpoint_bytes({
            "format": ckpt_io.CKPT_FORMAT, "config": run.config.to_dict(),
            "model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "rng": ckpt_io.rng_state(), "run": run.state.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None,
            "data": run.batches.ds.state_dict() if hasattr(run.batches, "ds") else None})
        run.write_or_exit("the checkpoint", run.ckpt_path,
                          lambda: ckpt_io.atomic_write(run.ckpt_path, data), len(data))
        run.last_good = run.where
    if run.world > 1:
        dist.barrier()


def restore(path: str, config: RunConfig, model, optimizer, state: RunState, steps_per_epoch: int,
            scaler=None, batches=None) -> None:
    """Load a checkpoint of the same run into the model, optimizer, RNG, run state and the
    dataset's own record (an image folder's file list and bad files)."""
    ckpt = ckpt_io.read_checkpoint(path)
    if ckpt.get("data") and hasattr(batches, "ds"):
        batches.ds.load_state_dict(ckpt["data"], rescan=config.rescan, where=metrics.files_list(config.out))
    saved = RunState()
    saved.load_state_dict(ckpt["run"])
    ckpt_io.check_same_run(path, ckpt_io.config_of(ckpt, path, "--resume"), config,
                           epoch=saved.epoch, step=saved.step, steps_per_epoch=steps_per_epoch)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SystemExit(f"--resume: {path} does not fit this model/optimizer: {exc}") from exc
    ckpt_io.set_rng_state(ckpt["rng"])
    if scaler is not None and ckpt.get("scaler"):  # fp16's loss scale, where the run had one
        scaler.load_state_dict(ckpt["scaler"])
    state.load_state_dict(ckpt["run"])


def save_metrics(run: Run) -> None:
    """<out>/metrics.csv from the run's history (a write failure ends the run: write_or_exit)."""
    path = os.path.join(run.config.out, "metrics.csv")
    run.write_or_exit("the metrics", path, lambda: metrics.write_metrics_csv(path, run.state.history))


if __name__ == "__main__":
    main()
