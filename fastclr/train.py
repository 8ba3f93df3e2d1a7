"""``python -m fastclr.train``: SimCLR pretraining, then kNN and linear-probe evaluation.

With no arguments it trains a small ResNet-18 on scikit-learn's bundled handwritten digits (no
download) for a few minutes on a CPU and prints, as its last line, one JSON object with the
results. Everything else is a flag: the dataset (digits, cifar10/100 archives, an image folder,
synthetic), the backbone, batch size, LARS hyper-parameters, the loss and optimizer backends, the
augmentation (DALI or the torch fallback), precision, evaluation and checkpoints.

Several GPUs or machines: ``torchrun --nproc-per-node K -m fastclr.train ...`` (DDP; NCCL on GPUs,
gloo on CPU). --batch-size is the global batch; each rank takes an equal share, the loss sees the
whole global batch (fastclr.distributed), and gradients equal the single-process ones.

Checkpoints (``--out``/checkpoint.pt) are written atomically every --ckpt-every epochs, at the end,
and on SIGTERM / SIGINT (the run then stops; exit status 128 + signal). ``--resume`` continues a
run exactly where it stopped, mid-epoch included.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import fastclr
from fastclr import augment as aug_mod
from fastclr import data as data_mod
from fastclr import evaluate, models
from fastclr.loss import IMPLS as LOSS_IMPLS
from fastclr.loss import nt_xent_fused

CKPT_FORMAT = "fastclr-checkpoint-1"
# A checkpoint may only resume a run that agrees on these.
RUN_DEFINING = ("dataset", "backbone", "width", "cifar_stem", "head_layers", "proj_dim",
                "batch_size", "image_size", "seed")
# Per-dataset defaults for the flags left unset (None) on the command line.
DATASET_DEFAULTS = {
    "digits": dict(epochs=100, batch_size=256, image_size=16, width=16, temperature=0.2,
                   crop_scale=0.3, flip=0.0, strength=0.5, base_lr=0.3, warmup_epochs=10,
                   eval_every=10),
    "cifar10": dict(epochs=200, batch_size=512, image_size=32, width=64, temperature=0.5,
                    crop_scale=0.08, flip=0.5, strength=0.5, base_lr=0.3, warmup_epochs=10),
    "imagefolder": dict(epochs=100, batch_size=4096, image_size=224, width=64, temperature=0.1,
                        crop_scale=0.08, flip=0.5, strength=1.0, base_lr=0.3, warmup_epochs=10),
    "synthetic": dict(epochs=2, batch_size=256, image_size=32, width=64, temperature=0.5,
                      crop_scale=0.08, flip=0.5, strength=0.5, base_lr=0.3, warmup_epochs=0),
}
DATASET_DEFAULTS["cifar100"] = DATASET_DEFAULTS["cifar10"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastclr.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", default="digits", choices=data_mod.DATASETS)
    a("--data-dir", help="cifar10/100: the folder holding the python archive; imagefolder: the "
                         "folder with train/ and val/")
    a("--out", help="output folder: checkpoint.pt, metrics.csv, tensorboard/, curves.png "
                    "(default runs/<dataset>)")
    a("--epochs", type=int)
    a("--batch-size", type=int, help="global batch (images; the loss sees 2x as many views)")
    a("--image-size", type=int, help="side of the augmented views")
    a("--backbone", default="resnet18", choices=sorted(models.BACKBONES))
    a("--width", type=int, help="channels of the first ResNet stage (64 = the standard network)")
    a("--cifar-stem", choices=("auto", "on", "off"), default="auto",
      help="3x3 stem without max-pool (auto: for views of 64 px and smaller)")
    a("--head-layers", type=int, default=2, choices=(2, 3))
    a("--proj-dim", type=int, default=128)
    a("--temperature", type=float)
    a("--base-lr", type=float, help="lr = base_lr x batch/256 (linear) or x sqrt(batch/256)")
    a("--lr-scaling", choices=("linear", "sqrt"), default="linear")
    a("--warmup-epochs", type=float, help="linear warm-up, then cosine decay to 0")
    a("--weight-decay", type=float, default=1e-6)
    a("--momentum", type=float, default=0.9)
    a("--loss-impl", default="auto", choices=LOSS_IMPLS)
    a("--optimizer-impl", default="auto", choices=fastclr.optim.IMPLS)
    a("--augment", choices=("auto", "dali", "torch"), default="auto",
      help="auto: DALI on a GPU when it is installed, else the torch augmentation (faster than "
           "DALI's CPU mode on small images)")
    a("--crop-scale", type=float, help="smallest crop area fraction of the random resized crop")
    a("--flip", type=float, help="horizontal flip probability")
    a("--strength", type=float, help="colour-jitter strength")
    a("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="auto: bf16 autocast on GPU")
    a("--channels-last", choices=("auto", "on", "off"), default="auto", help="auto: on for GPU")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--device", default="auto", help="auto | cpu | cuda")
    a("--workers", type=int, default=4, help="image-folder decoding processes")
    a("--synthetic-size", type=int, default=4096)
    a("--eval-every", type=int, help="kNN every E epochs (0: only at the end; digits: 10)")
    a("--knn-k", type=int, default=200)
    a("--knn-temperature", type=float, default=0.1)
    a("--probe-epochs", type=int, default=100)
    a("--eval-random-init", action="store_true",
      help="also evaluate the model at random initialisation, to show what training bought")
    a("--ckpt-every", type=int, default=1, help="checkpoint every E epochs")
    a("--resume", help="a checkpoint to continue from, or 'auto': <out>/checkpoint.pt if it exists")
    a("--max-bad-steps", type=int, default=20,
      help="stop (after saving) when this many steps in a row have a non-finite loss")
    a("--seed", type=int, default=0)
    a("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for k, v in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.eval_every is None:
        args.eval_every = 0
    if args.out is None:
        args.out = os.path.join("runs", args.dataset)
    positive = ("epochs", "batch_size", "image_size", "width", "proj_dim", "knn_k", "ckpt_every",
                "max_bad_steps", "synthetic_size")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("temperature", "base_lr", "knn_temperature"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in ("eval_every", "probe_epochs", "warmup_epochs", "weight_decay", "momentum", "workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 < args.crop_scale <= 1:
        p.error(f"--crop-scale must be in (0, 1], got {args.crop_scale}")
    if not 0 <= args.flip <= 1:
        p.error(f"--flip must be a probability, got {args.flip}")
    if args.warmup_epochs >= args.epochs:
        args.warmup_epochs = 0.1 * args.epochs
    return args


# --- set-up -----------------------------------------------------------------------------------

def setup_distributed(device_arg: str):
    """(device, rank, world_size, local_rank); initialises torch.distributed under torchrun."""
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world, local_rank


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


class _Augmenter:
    """Per-step views: the torch augmentation seeded by (seed, step, rank), so a resumed run draws
    exactly what an uninterrupted one does."""

    def __init__(self, args, mean, std, device, dtype, channels_last, rank):
        self.t = aug_mod.TorchSimCLRAugment(args.image_size, strength=args.strength, mean=mean,
                                            std=std, dtype=dtype, channels_last=channels_last,
                                            scale=(args.crop_scale, 1.0), flip=args.flip)
        self.gen = torch.Generator(device=device)
        self.seed, self.rank, self.device = args.seed, rank, device

    def __call__(self, x, step):
        self.gen.manual_seed(((self.seed * 1_000_003 + step) * 1009 + self.rank) & (2**63 - 1))
        return self.t(x.to(self.device, non_blocking=True), generator=self.gen)


class _FolderBatches:
    """Image-folder batches for the torch augmentation: decoded and resized to a square in
    DataLoader workers, the same global-batch layout and resumability as ArrayBatches."""

    def __init__(self, root, size, global_batch, seed, rank, world, workers):
        import torchvision
        from torchvision.transforms import v2 as T
        self.ds = torchvision.datasets.ImageFolder(
            root, transform=T.Compose([T.Resize((size, size), antialias=True), T.PILToTensor()]))
        if global_batch > len(self.ds):
            raise ValueError(f"--batch-size {global_batch} is larger than {root} ({len(self.ds)} images)")
        self.global_batch, self.local = global_batch, global_batch // world
        self.seed, self.rank, self.workers = seed, rank, workers

    def __len__(self):
        return len(self.ds) // self.global_batch

    def epoch(self, epoch, start=0):
        idx = list(data_mod.shard_indices(len(self.ds), self.global_batch, self.local, self.rank,
                                          self.seed, epoch, start))
        idx = torch.cat(idx).tolist() if idx else []
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(self.ds, idx),
                                             batch_size=self.local, num_workers=self.workers,
                                             pin_memory=torch.cuda.is_available())
        yield from loader


def _eval_batches(ds, split: str, size: int, workers: int, batch: int = 512):
    """(uint8 (b, 3, size, size), labels) batches of a split, unaugmented, in order."""
    if isinstance(ds, data_mod.ArrayDataset):
        images = ds.train_images if split == "train" else ds.test_images
        labels = torch.from_numpy(ds.train_labels if split == "train" else ds.test_labels)
        for lo in range(0, len(images), batch):
            yield data_mod.eval_arrays(images[lo:lo + batch], size), labels[lo:lo + batch]
        return
    import torchvision
    from torchvision.transforms import v2 as T
    folder = torchvision.datasets.ImageFolder(
        ds.train_dir if split == "train" else ds.val_dir,
        transform=T.Compose([T.Resize(int(round(size * 256 / 224)), antialias=True),
                             T.CenterCrop(size), T.PILToTensor()]))
    yield from torch.utils.data.DataLoader(folder, batch_size=batch, num_workers=workers)


def run_evaluation(backbone, ds, args, device, dtype, channels_last, *, probe: bool) -> dict:
    kw = dict(mean=ds.mean, std=ds.std, device=device, dtype=dtype, channels_last=channels_last)
    ftr, ytr = evaluate.extract_features(backbone, _eval_batches(ds, "train", args.image_size, args.workers), **kw)
    fte, yte = evaluate.extract_features(backbone, _eval_batches(ds, "test", args.image_size, args.workers), **kw)
    out = {"knn_top1": evaluate.knn_accuracy(ftr, ytr, fte, yte, ds.num_classes, k=args.knn_k,
                                             temperature=args.knn_temperature)}
    if probe:
        out["linear_top1"] = evaluate.linear_probe(ftr, ytr, fte, yte, ds.num_classes,
                                                   epochs=args.probe_epochs, seed=args.seed)
    return out


# --- checkpoints ------------------------------------------------------------------------------

def save_checkpoint(path: str, state: dict) -> None:
    """Atomically: write a temporary file beside ``path``, fsync it, rename over ``path``, fsync
    the folder. A crash at any point leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
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


def load_checkpoint(path: str, args) -> dict:
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the same thing here
        raise SystemExit(f"--resume: cannot read checkpoint {path} (truncated, corrupt or not a "
                         f"torch file): {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise SystemExit(f"--resume: {path} is not a fastclr training checkpoint ({CKPT_FORMAT})")
    theirs = state["args"]
    diff = [f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {getattr(args, k)!r} here"
            for k in RUN_DEFINING if theirs.get(k) != getattr(args, k)]
    if diff:
        raise SystemExit(f"--resume: {path} belongs to a different run: " + "; ".join(diff))
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves and stops after the current step."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        self.signum = signum

    def install(self):
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

    def uninstall(self):
        for s, h in self.previous.items():
            signal.signal(s, h)


# --- outputs ----------------------------------------------------------------------------------

METRIC_FIELDS = ("epoch", "step", "loss", "contrastive_top1", "lr", "images_per_sec", "knn_top1",
                 "bad_steps", "elapsed_s")


def write_metrics_csv(path: str, history: list) -> None:
    """The whole history, rewritten atomically, so a resumed run never repeats or loses a row."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_FIELDS})
    os.replace(tmp, path)


def plot_curves(path: str, history: list, final: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(ep, [r["loss"] for r in history])
    ax1.set(xlabel="epoch", ylabel="NT-Xent loss", title="training loss")
    ax2.plot(ep, [r["contrastive_top1"] for r in history], label="contrastive top-1 (train batch)")
    knn = [(r["epoch"], r["knn_top1"]) for r in history if r.get("knn_top1") is not None]
    if knn:
        ax2.plot(*zip(*knn), "o-", label="kNN top-1 (held out)")
    if final.get("linear_top1") is not None:
        ax2.axhline(final["linear_top1"], ls="--", c="k", label="linear probe top-1 (held out)")
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the loop ---------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    device, rank, world, _ = setup_distributed(args.device)
    try:
        return _train(args, device, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(args, device, rank, world) -> dict:
    main_rank = rank == 0
    torch.manual_seed(args.seed)
    gpu = device.type == "cuda"
    amp_dtype = torch.bfloat16 if (args.precision == "bf16" or (args.precision == "auto" and gpu)) else None
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and gpu)
    if args.cifar_stem == "auto":
        args.cifar_stem = "on" if args.image_size <= 64 else "off"
    group = dist.group.WORLD if world > 1 else None

    try:
        ds = data_mod.load_dataset(args.dataset, args.data_dir, synthetic_size=args.synthetic_size,
                                   synthetic_image_size=args.image_size)
        if args.batch_size % world:
            raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
        use_dali = args.augment == "dali" or (args.augment == "auto" and gpu and aug_mod.dali_available())
        if use_dali and not aug_mod.dali_available():
            raise SystemExit("--augment dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        if isinstance(ds, data_mod.ArrayDataset):
            batches = data_mod.ArrayBatches(ds.train_images, ds.train_labels, args.batch_size,
                                            seed=args.seed, rank=rank, world_size=world)
        else:
            batches = _FolderBatches(ds.train_dir, int(round(args.image_size * 256 / 224)), args.batch_size,
                                     args.seed, rank, world, args.workers)
    except (ValueError, FileNotFoundError) as exc:  # bad data or flags: a message, not a traceback
        raise SystemExit(f"fastclr.train: {exc}") from exc
    steps_per_epoch = len(batches)
    if use_dali:
        source = ds.train_images if isinstance(ds, data_mod.ArrayDataset) else ds.train_dir
        dali = aug_mod.dali_loader(source, args.batch_size // world, args.image_size,
                                   device="gpu" if gpu else "cpu", strength=args.strength,
                                   mean=ds.mean, std=ds.std, dtype=amp_dtype or torch.float32,
                                   channels_last=channels_last, seed=args.seed, shard_id=rank,
                                   num_shards=world, scale=(args.crop_scale, 1.0), flip=args.flip)
        steps_per_epoch = min(steps_per_epoch, len(dali))
    else:
        augmenter = _Augmenter(args, ds.mean, ds.std, device, amp_dtype or torch.float32,
                               channels_last, rank)

    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))

    model = models.build_model(args.backbone, width=args.width, cifar_stem=args.cifar_stem == "on",
                               head_layers=args.head_layers, proj_dim=args.proj_dim).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    scale = args.batch_size / 256
    lr = args.base_lr * (scale if args.lr_scaling == "linear" else math.sqrt(scale))
    optimizer = fastclr.LARS(fastclr.lars_param_groups(model, args.weight_decay), lr=lr,
                             momentum=args.momentum, impl=args.optimizer_impl)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling

    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_epoch, start_batch, step, bad_total, history, train_time = 0, 0, 0, 0, [], 0.0
    partial = [0.0, 0.0, 0, 0, 0.0]  # an interrupted epoch's loss sum, top-1 sum, steps, images, seconds
    resume = args.resume
    if resume == "auto":
        resume = ckpt_path if os.path.isfile(ckpt_path) else None
    state = load_checkpoint(resume, args) if resume else {}
    random_init = state.get("random_init")
    if args.eval_random_init and main_rank and random_init is None:
        random_init = run_evaluation(model.backbone, ds, args, device, amp_dtype, channels_last, probe=True)
    if resume:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise SystemExit(f"--resume: {resume} does not fit this model/optimizer: {exc}") from exc
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        bad_total, history, train_time = state["bad_steps"], state["history"], state["train_time"]
        partial = state["partial_epoch"]
    if world > 1 and gpu:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if gpu else None)
    fwd = torch.compile(model) if args.compile else model

    writer = None
    if main_rank:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(os.path.join(args.out, "tensorboard"), purge_step=step)
        print(f"fastclr {fastclr.__version__}: SimCLR on {args.dataset} ({steps_per_epoch} steps/epoch "
              f"of {args.batch_size} images, {args.epochs} epochs), {args.backbone} width {args.width}, "
              f"{world} process(es) on {device}, loss impl {args.loss_impl}, LARS impl "
              f"{optimizer.backend(device)}, augmentation {'DALI' if use_dali else 'torch'}, "
              f"{'bf16' if amp_dtype else 'fp32'}; out {args.out}"
              + (f"; resumed at epoch {start_epoch} step {step}" if resume else ""), flush=True)

    stop = _StopRequest()
    stop.install()

    def checkpoint(epoch, batch, partial_epoch=(0.0, 0.0, 0, 0, 0.0)):
        if main_rank:
            save_checkpoint(ckpt_path, {
                "format": CKPT_FORMAT, "args": vars(args), "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(), "epoch": epoch, "batch": batch,
                "step": step, "bad_steps": bad_total, "history": history, "train_time": train_time,
                "random_init": random_init,
                "partial_epoch": list(partial_epoch)})
        if world > 1:
            dist.barrier()

    bad_run = 0
    exit_code, exit_msg = 0, None
    try:
        for epoch in range(start_epoch, args.epochs):
            if use_dali:
                it = iter(dali)
                for _ in range(start_batch):  # same batches; DALI's own draws restart
                    next(it)
                source_iter = ((v1, v2) for v1, v2, _ in it)
            else:
                source_iter = ((x,) for x, _ in batches.epoch(epoch, start_batch))
            bar = tqdm(total=steps_per_epoch, initial=start_batch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       unit="step", disable=not main_rank or args.no_progress, dynamic_ncols=True,
                       file=sys.stderr)
            sums = torch.tensor(partial[:2], device=device, dtype=torch.float64)
            counted, images, t_before = partial[2], partial[3], partial[4]
            partial = [0.0, 0.0, 0, 0, 0.0]
            t_epoch = time.perf_counter()
            batch_idx = start_batch
            for item in source_iter:
                if batch_idx >= steps_per_epoch:
                    break
                if use_dali:
                    v1, v2 = item
                else:
                    v1, v2 = augmenter(item[0], step)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    _, z = fwd(torch.cat([v1, v2]))
                z1, z2 = z.float().chunk(2)
                loss, acc = nt_xent_fused(z1, z2, args.temperature, impl=args.loss_impl,
                                          return_accuracy=True, process_group=group)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # one small all-reduce (and host sync) per step: the loss for the log, whether any
                # rank saw a non-finite loss, whether any rank was asked to stop
                flags = torch.stack([loss.detach().double(), acc["top1"].double(),
                                     (~torch.isfinite(loss.detach())).double(),
                                     torch.tensor(float(stop.signum), device=device, dtype=torch.float64)])
                if world > 1:
                    dist.all_reduce(flags)
                loss_v, top1_v, nonfinite, signum = flags.tolist()
                if nonfinite:
                    bad_total += 1
                    bad_run += 1
                    optimizer.zero_grad(set_to_none=True)
                else:
                    bad_run = 0
                    optimizer.step()
                    sums += torch.tensor([loss_v / world, top1_v / world], dtype=torch.float64, device=device)
                    counted += 1
                scheduler.step()
                step += 1
                batch_idx += 1
                images += args.batch_size
                if main_rank:
                    el = t_before + time.perf_counter() - t_epoch
                    bar.set_postfix(loss=f"{loss_v / world:.4f}", lr=f"{scheduler.get_last_lr()[0]:.3g}",
                                    img_s=f"{images / max(el, 1e-9):.0f}", refresh=False)
                    bar.update(1)
                    if step % 10 == 0 and writer is not None:
                        writer.add_scalar("train/loss", loss_v / world, step)
                        writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                if bad_run >= args.max_bad_steps or signum:
                    dt = time.perf_counter() - t_epoch
                    train_time += dt
                    checkpoint(epoch, batch_idx, (*sums.tolist(), counted, images, t_before + dt))
                if bad_run >= args.max_bad_steps:
                    exit_code = 3
                    exit_msg = (f"stopping: {bad_run} steps in a row had a non-finite loss ({bad_total} "
                                f"in all); checkpoint {ckpt_path} (epoch {epoch}, step {step}). Lower "
                                "--base-lr or raise --temperature, then --resume")
                    raise _Stop
                if signum:
                    sig = int(signum) if world == 1 else signal.SIGTERM
                    exit_code = 128 + sig
                    exit_msg = (f"stopped by {signal.Signals(sig).name} at epoch {epoch + 1}, step {step}; "
                                f"checkpoint {ckpt_path}; continue with --resume {ckpt_path}")
                    raise _Stop
            bar.close()
            dt = time.perf_counter() - t_epoch
            train_time += dt
            dt += t_before
            row = {"epoch": epoch + 1, "step": step,
                   "loss": (sums[0] / max(counted, 1)).item(), "contrastive_top1": (sums[1] / max(counted, 1)).item(),
                   "lr": scheduler.get_last_lr()[0],
                   "images_per_sec": images / dt if dt > 0 else None, "bad_steps": bad_total,
                   "elapsed_s": train_time}
            last = epoch + 1 == args.epochs
            if main_rank and args.eval_every and (epoch + 1) % args.eval_every == 0 and not last:
                row["knn_top1"] = run_evaluation(raw_model.backbone, ds, args, device, amp_dtype,
                                                 channels_last, probe=False)["knn_top1"]
            history.append(row)
            start_batch = 0
            if main_rank:
                write_metrics_csv(os.path.join(args.out, "metrics.csv"), history)
                for k in ("loss", "contrastive_top1", "images_per_sec", "knn_top1"):
                    if row.get(k) is not None:
                        writer.add_scalar(f"epoch/{k}", row[k], row["epoch"])
            if (epoch + 1) % args.ckpt_every == 0 or last:
                checkpoint(epoch + 1, 0)
    except _Stop:
        pass
    finally:
        stop.uninstall()
        if writer is not None:
            writer.flush()

    if exit_code:
        if main_rank:
            print(exit_msg, file=sys.stderr, flush=True)
        raise SystemExit(exit_code)

    result = None
    if main_rank:
        final = run_evaluation(raw_model.backbone, ds, args, device, amp_dtype, channels_last, probe=True)
        if history:
            history[-1]["knn_top1"] = final["knn_top1"]
            write_metrics_csv(os.path.join(args.out, "metrics.csv"), history)
        writer.add_scalar("eval/knn_top1", final["knn_top1"], step)
        writer.add_scalar("eval/linear_top1", final["linear_top1"], step)
        writer.close()
        plot_curves(os.path.join(args.out, "curves.png"), history, final)
        result = {
            "knn_top1": final["knn_top1"], "linear_top1": final["linear_top1"],
            "images_per_sec": (step * args.batch_size / train_time) if train_time > 0 else None,
            "epochs": args.epochs, "steps": step, "checkpoint": os.path.abspath(ckpt_path),
            "final_loss": history[-1]["loss"] if history else None, "bad_steps": bad_total,
            "train_time_s": train_time, "dataset": args.dataset, "backbone": args.backbone,
            "width": args.width, "batch_size": args.batch_size, "world_size": world,
            "device": str(device), "out": os.path.abspath(args.out),
        }
        if random_init is not None:
            result["random_init"] = random_init
        print(json.dumps(result), flush=True)
    if world > 1:
        dist.barrier()
    return result


class _Stop(Exception):
    pass


if __name__ == "__main__":
    main()
