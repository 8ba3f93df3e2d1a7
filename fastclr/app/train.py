"""``python -m fastclr.train``: SimCLR pretraining, then kNN and linear-probe evaluation.

With no arguments it trains a small ResNet-18 on scikit-learn's bundled handwritten digits (no
download) for a few minutes on a CPU and prints, as its last line, one JSON object with the
results. Every flag can also come from a YAML file (``--config FILE.yaml``, keys named as the
flags; flags on the command line override it; ``--config NAME`` takes a shipped recipe,
fastclr/app/configs/NAME.yaml, from any folder; ``shipped_configs()`` lists them); the resolved
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

import argparse
import csv
import dataclasses
import difflib
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm

import fastclr
from fastclr.app import augment as aug_mod
from fastclr.app import data as data_mod
from fastclr.app import eval_run, models
from fastclr.grad_cache import grad_cache_backward
from fastclr.loss import IMPLS as LOSS_IMPLS
from fastclr.loss import nt_xent_fused, supcon_fused

CKPT_FORMAT = "fastclr-checkpoint-2"
# A checkpoint may only resume a run that agrees on these ...
RUN_DEFINING = ("dataset", "backbone", "width", "cifar_stem", "head_layers", "proj_dim",
                "proj_hidden", "batch_size", "image_size", "seed", "loss", "views", "positives",
                "optimizer")
# ... and on these, which fix the learning-rate schedule (warm-up, then cosine to 0 at the end).
SCHEDULE = ("epochs", "warmup_epochs")
OPTIMIZERS = ("lars", "sgd", "adamw")
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 with loss scaling"}
ADAMW_BASE_LR = 1e-3  # --base-lr's default with --optimizer adamw (the datasets' are for LARS/SGD)
# what a checkpoint written before a key existed meant by it
RUN_DEFAULTS_BEFORE = {"optimizer": "lars"}
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_configs() -> list:
    """The names of the recipes shipped with fastclr (``--config NAME``)."""
    return sorted(f[:-len(".yaml")] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


# Per-dataset defaults of the flags left unset (None) on the command line and in the config.
DATASET_DEFAULTS = {
    "digits": dict(epochs=50, batch_size=256, image_size=16, width=16, temperature=0.15,
                   crop_scale=0.3, flip=0.0, strength=0.5, base_lr=0.5, warmup_epochs=5,
                   eval_every=10),
    "cifar10": dict(epochs=200, batch_size=512, image_size=32, width=64, temperature=0.5,
                    crop_scale=0.08, flip=0.5, strength=0.5, base_lr=0.3, warmup_epochs=10,
                    eval_every=0),
    "imagefolder": dict(epochs=100, batch_size=4096, image_size=224, width=64, temperature=0.1,
                        crop_scale=0.08, flip=0.5, strength=1.0, base_lr=0.3, warmup_epochs=10,
                        eval_every=0),
    "synthetic": dict(epochs=2, batch_size=256, image_size=32, width=64, temperature=0.5,
                      crop_scale=0.08, flip=0.5, strength=0.5, base_lr=0.3, warmup_epochs=0,
                      eval_every=0),
}
DATASET_DEFAULTS["cifar100"] = DATASET_DEFAULTS["cifar10"]
_NOT_CONFIG = ("config", "resume", "help")  # flags that are not part of a run's configuration

# (flag, argparse keywords): the whole command line, one table. default=None: per dataset.
FLAGS = (
    ("--config", dict(metavar="FILE.yaml|NAME", help="a YAML file of flags (keys as the flags' names), "
                      f"or a shipped recipe's name ({', '.join(shipped_configs())}); flags given here "
                      "override it")),
    ("--dataset", dict(default="digits", choices=data_mod.DATASETS, help="the training data")),
    ("--data-dir", dict(help="cifar10/100: the folder holding the python archive; imagefolder: the "
                             "folder with train/ and val/")),
    ("--out", dict(help="output folder: checkpoint.pt, config.yaml, metrics.csv, tensorboard/, "
                        "curves.png (default: runs/<dataset>)")),
    ("--epochs", dict(type=int, help="passes over the training set")),
    ("--batch-size", dict(type=int, help="global batch (images; the loss sees V x as many views)")),
    ("--image-size", dict(type=int, help="side of the augmented views")),
    ("--backbone", dict(default="resnet18", help="the encoder: any torchvision classification model "
                        "by name (resnet18, mobilenet_v3_small, efficientnet_b0, convnext_tiny, "
                        "vit_b_16, ...); its classifier is replaced by the head")),
    ("--width", dict(type=int, help="ResNets only: channels of the first stage (64 = the standard "
                                    "network)")),
    ("--cifar-stem", dict(choices=("auto", "on", "off"), default="auto",
                          help="the small-image stem: ResNets a 3x3 stride-1 conv1 without max-pool, "
                               "networks with a 3x3 stride-2 first convolution that stride 1 "
                               "(auto: on for views of 64 px and smaller where it applies)")),
    ("--head-layers", dict(type=int, default=2, choices=(2, 3), help="projection-head layers")),
    ("--proj-hidden", dict(type=int, help="projection head's hidden width (default: the backbone's "
                                          "feature width)")),
    ("--proj-dim", dict(type=int, default=128, help="projection (embedding) dimension")),
    ("--loss", dict(choices=("ntxent", "supcon", "supervised"), default="ntxent",
                    help="ntxent: SimCLR (views of the same image are positives); supcon: "
                         "supervised contrastive (images of the same class are positives); "
                         "supervised: the baseline, cross-entropy on the labels through a linear "
                         "classifier in place of the projection head (same augmentation, epochs "
                         "and optimizer)")),
    ("--views", dict(type=int, default=2, help="augmented views per image (> 2: multi-view)")),
    ("--micro-batch", dict(type=int, help="gradient caching: forward at most this many images (with "
                                          "their views) at a time on each process, the loss still on "
                                          "the whole batch (exact gradients without BatchNorm; with it, "
                                          "statistics per micro-batch). Default: the whole batch at once")),
    ("--positives", dict(choices=("mean", "sum"), default="mean",
                         help="with several positives per row: mean of their logits (SupCon's "
                              "L_out) or logsumexp (L_in, solo-learn's multi-positive SimCLR)")),
    ("--temperature", dict(type=float, help="the loss's temperature tau")),
    ("--optimizer", dict(choices=OPTIMIZERS, default="lars",
                         help="lars (fastclr.LARS), sgd (momentum) or adamw (torch's fused ones); "
                              "weight decay never on biases and norms, for all three")),
    ("--base-lr", dict(type=float, help="lr = base_lr x batch/256 (linear) or x sqrt(batch/256) "
                                        f"(adamw's default: {ADAMW_BASE_LR})")),
    ("--lr-scaling", dict(choices=("linear", "sqrt"), default="linear", help="see --base-lr")),
    ("--warmup-epochs", dict(type=float, help="linear warm-up, then cosine decay to 0 (a tenth of "
                                               "the run if not shorter than --epochs)")),
    ("--weight-decay", dict(type=float, default=1e-6, help="weight decay (not on biases and norms)")),
    ("--momentum", dict(type=float, default=0.9, help="LARS's and SGD's momentum")),
    ("--trust-coefficient", dict(type=float, default=0.001, help="LARS's trust coefficient (eta)")),
    ("--loss-impl", dict(default="auto", choices=LOSS_IMPLS, help="the loss kernels' backend")),
    ("--optimizer-impl", dict(default="auto", choices=fastclr.optim.IMPLS, help="the LARS step's backend")),
    ("--augment", dict(choices=("auto", "dali", "torch"), default="auto",
                       help="auto: DALI on a GPU when it is installed, else the torch augmentation "
                            "(faster than DALI's CPU mode on small images)")),
    ("--crop-scale", dict(type=float, help="smallest crop area fraction of the random resized crop")),
    ("--flip", dict(type=float, help="horizontal flip probability")),
    ("--strength", dict(type=float, help="colour-jitter strength")),
    ("--precision", dict(choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                         help="auto: bf16 autocast on GPU; fp16: float16 autocast with loss scaling "
                              "(GPUs without bfloat16: V100, T4)")),
    ("--channels-last", dict(choices=("auto", "on", "off"), default="auto",
                             help="auto: on for GPU (on a CPU it is faster too, but oneDNN's "
                                  "channels_last kernels are not deterministic: no exact resume)")),
    ("--compile", dict(action="store_true", help="torch.compile the model")),
    ("--device", dict(default="auto", help="auto | cpu | cuda")),
    ("--workers", dict(type=int, default=4, help="image-folder decoding processes")),
    ("--synthetic-size", dict(type=int, default=4096, help="images of --dataset synthetic")),
    ("--eval-every", dict(type=int, help="kNN every E epochs (0: only at the end)")),
    ("--knn-k", dict(type=int, default=200, help="kNN neighbours")),
    ("--knn-temperature", dict(type=float, default=0.1, help="kNN vote temperature")),
    ("--probe-epochs", dict(type=int, default=100, help="linear-probe epochs")),
    ("--eval-random-init", dict(action="store_true",
                                help="also evaluate the model at random initialisation")),
    ("--log-every", dict(type=int, default=10, help="read the loss and the stop flags every N "
                                                    "steps (the only host synchronisations)")),
    ("--ckpt-every", dict(type=int, default=1, help="checkpoint every E epochs")),
    ("--ckpt-every-steps", dict(type=int, default=0, help="also checkpoint every N steps (0: off)")),
    ("--resume", dict(help="a checkpoint to continue from, or 'auto': <out>/checkpoint.pt if it "
                           "exists")),
    ("--max-bad-steps", dict(type=int, default=20, help="stop (after saving) when this many steps "
                                                        "in a row had a non-finite loss")),
    ("--seed", dict(type=int, default=0, help="seeds the model, the data order and the augmentation")),
    ("--no-progress", dict(action="store_true", help="no progress bar")),
)
_AT_LEAST_1 = ("epochs", "batch_size", "image_size", "width", "proj_dim", "knn_k", "ckpt_every",
               "max_bad_steps", "synthetic_size", "log_every")
_POSITIVE = ("temperature", "base_lr", "knn_temperature", "trust_coefficient")
_NON_NEGATIVE = ("eval_every", "probe_epochs", "warmup_epochs", "weight_decay", "momentum",
                 "workers", "ckpt_every_steps")


# --- configuration ----------------------------------------------------------------------------

class _Help(argparse.RawDescriptionHelpFormatter):
    """Every flag's default in --help, and for the per-dataset ones the value for each dataset."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.dest in DATASET_DEFAULTS["digits"]:
            per = ", ".join(f"{name} {d[action.dest]}" for name, d in DATASET_DEFAULTS.items())
            text += f" (default per --dataset: {per})"
        elif action.default not in (None, False, argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastclr.train", description=__doc__,
                                formatter_class=_Help)
    for flag, kw in FLAGS:
        p.add_argument(flag, **kw)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The run's configuration: per-dataset defaults < --config FILE < command-line flags."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config, parser))
    args = parser.parse_args(argv)
    _resolve_backbone(args, parser)
    if args.optimizer == "adamw" and args.base_lr is None:
        args.base_lr = ADAMW_BASE_LR
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key) is None and not (key == "width" and args.backbone not in models.RESNETS):
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join("runs", args.dataset)
    if args.cifar_stem == "auto":
        args.cifar_stem = "on" if args.image_size <= 64 and models.cifar_stem_applies(args.backbone) else "off"
    if args.warmup_epochs >= args.epochs:  # a short run: a tenth of it
        args.warmup_epochs = 0.1 * args.epochs
    _check_args(args, parser)
    return args


def _resolve_backbone(args, parser) -> None:
    """--backbone names a torchvision classification model; --width is the ResNets' alone."""
    try:
        models.check_backbone_name(args.backbone)
    except ValueError as exc:
        parser.error(str(exc))
    if args.width is not None and args.backbone not in models.RESNETS:
        parser.error(f"--width applies to the ResNets ({', '.join(models.RESNETS)}), not to "
                     f"{args.backbone}")


def _check_args(args, parser) -> None:
    def bad(name, rule):
        parser.error(f"--{name.replace('_', '-')} must be {rule}, got {getattr(args, name)}")
    for name in _AT_LEAST_1:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            bad(name, ">= 1")
    for name in _POSITIVE:
        if not getattr(args, name) > 0:
            bad(name, "> 0")
    for name in _NON_NEGATIVE:
        if getattr(args, name) < 0:
            bad(name, ">= 0")
    for name in ("proj_hidden", "micro_batch"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            bad(name, ">= 1")
    if args.views < 2:
        bad("views", ">= 2 (a contrastive loss needs two views of an image)")
    if not 0 < args.crop_scale <= 1:
        bad("crop_scale", "in (0, 1]")
    if not 0 <= args.flip <= 1:
        bad("flip", "a probability")


def config_path(name_or_path: str) -> str:
    """``--config``'s file: a path as given, or a shipped recipe's name (``digits``)."""
    if os.path.exists(name_or_path) or os.sep in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return name_or_path
    if name_or_path in shipped_configs():
        return os.path.join(CONFIG_DIR, name_or_path + ".yaml")
    raise SystemExit(f"--config: {name_or_path!r} is neither a file nor a shipped recipe "
                     f"({', '.join(shipped_configs())})")


def load_config(path: str, parser: argparse.ArgumentParser) -> dict:
    """A YAML mapping of flag names (``batch_size`` or ``batch-size``) to values, checked as the
    command line checks them: unknown keys, wrong types and values outside the choices refused.
    ``path`` may name a shipped recipe instead (``digits``)."""
    import yaml
    path = config_path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"--config: cannot read {path}: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SystemExit(f"--config: {path} must be a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in _NOT_CONFIG}
    out = {}
    for key, value in raw.items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            near = difflib.get_close_matches(dest, list(actions), n=1)
            raise SystemExit(f"--config: {path}: unknown key {key!r}"
                             + (f" (did you mean {near[0]!r}?)" if near else ""))
        out[dest] = _config_value(actions[dest], value, f"--config: {path}: {key}")
    return out


def _config_value(action, value, where: str):
    if value is None:
        if action.default is not None:
            raise SystemExit(f"{where} cannot be null")
        return None
    kind = bool if isinstance(action, argparse._StoreTrueAction) else (action.type or str)
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise SystemExit(f"{where} must be {kind.__name__}, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise SystemExit(f"{where} must be one of {list(action.choices)}, got {value!r}")
    return value


def run_config(args) -> dict:
    """The resolved configuration: every flag but --config / --resume."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG}


# --- the run's state --------------------------------------------------------------------------

@dataclass
class EpochSums:
    """The current epoch so far, as last read from the device."""
    loss: float = 0.0        # sum over the steps that updated
    top1: float = 0.0
    good_steps: int = 0
    seconds: float = 0.0


@dataclass
class RunState:
    """Where a run is: everything a checkpoint needs besides the model and optimizer."""
    epoch: int = 0           # epochs completed
    batch: int = 0           # batches of epoch `epoch` done
    step: int = 0
    bad_steps: int = 0       # skipped (non-finite) steps in all
    bad_run: int = 0         # ... in a row, up to now
    train_time: float = 0.0
    history: list = field(default_factory=list)
    random_init: dict | None = None
    current: EpochSums = field(default_factory=EpochSums)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, state[f.name])
        self.current = EpochSums(**state["current"])

    def position(self, steps_per_epoch: int, epochs: int) -> str:
        """Where the run is, in the one numbering every message uses (epochs from 1)."""
        if self.batch == 0:
            return f"after epoch {self.epoch} of {epochs} (step {self.step})"
        return (f"in epoch {self.epoch + 1} of {epochs}, after batch {self.batch} of "
                f"{steps_per_epoch} (step {self.step})")


class DeviceSums:
    """The step's bookkeeping, on the device: loss and top-1 sums of the steps that updated,
    their count, the skipped steps and the current run of them. ``read`` is the one host
    synchronisation (and, with several processes, one all-reduce that also carries the stop
    request)."""

    def __init__(self, device, bad_run: int):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.bad_run = torch.tensor(float(bad_run), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, top1: torch.Tensor, found_inf: torch.Tensor) -> None:
        bad = found_inf.reshape(()) > 0
        self.sums += torch.stack([torch.where(bad, 0.0, loss.double()),
                                  torch.where(bad, 0.0, top1.double()),
                                  (~bad).double(), bad.double()])
        self.bad_run.add_(1).mul_(bad)

    def read(self, signum: int, group) -> tuple:
        """(loss sum, top-1 sum, good steps, bad steps, bad run, signal) since the last read."""
        t = torch.cat([self.sums, self.bad_run.view(1), self.sums.new_tensor([float(signum)])])
        world = 1
        if group is not None:
            dist.all_reduce(t, group=group)
            world = dist.get_world_size(group)
        *values, signum = t.tolist()
        self.sums.zero_()
        # the ranks agree on all but the loss, whose mean over ranks is the global batch's
        loss, top1, good, bad, bad_run = (v / world for v in values)
        if world > 1 and signum:
            signum = signal.SIGTERM  # a sum of the ranks' signals: say SIGTERM
        return loss, top1, round(good), round(bad), round(bad_run), int(signum)


@dataclass
class Run:
    """What the loop works with, set up once by ``setup_run``."""
    args: argparse.Namespace
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
    sums: DeviceSums
    writer: object
    ckpt_path: str
    peak_lr: float
    stop_request: "_StopRequest"
    last_good: str | None = None  # where the last checkpoint written (or resumed from) stands
    scaler: torch.amp.GradScaler | None = None  # --precision fp16's loss scale

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    def lr_at(self, step: int) -> float:
        return self.peak_lr * lr_factor(step, self.args.epochs * self.steps_per_epoch,
                                        int(round(self.args.warmup_epochs * self.steps_per_epoch)))


@dataclass
class Stop:
    """Why the loop ended: "done", "signal" (with its number) or "bad_steps"."""
    reason: str
    signum: int = 0


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


# --- set-up -----------------------------------------------------------------------------------

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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=_attempt_store(world),
                                rank=rank, world_size=world)
    return device, rank, world


def _attempt_store(world: int):
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


class TorchViews:
    """Per-step views from the torch augmentation, seeded by (seed, step, rank), so a resumed
    run draws exactly what an uninterrupted one does."""

    def __init__(self, args, mean, std, device, dtype, channels_last, rank):
        self.t = aug_mod.TorchSimCLRAugment(args.image_size, strength=args.strength, mean=mean,
                                            std=std, dtype=dtype, channels_last=channels_last,
                                            scale=(args.crop_scale, 1.0), flip=args.flip)
        self.gen = torch.Generator(device=device)
        self.seed, self.rank, self.device, self.views = args.seed, rank, device, args.views

    def __call__(self, x, step):
        self.gen.manual_seed(((self.seed * 1_000_003 + step) * 1009 + self.rank) & (2**63 - 1))
        return self.t(x.to(self.device, non_blocking=True), generator=self.gen, views=self.views)


def _load_data(args, device, rank, world, amp_dtype, channels_last):
    """(dataset, training batches, the augmentation the loop applies or None for DALI)."""
    gpu = device.type == "cuda"
    use_dali = args.augment == "dali" or (args.augment == "auto" and gpu and aug_mod.dali_available())
    if use_dali and not aug_mod.dali_available():
        raise SystemExit("--augment dali: NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    dali = None
    if use_dali:
        dali = dict(device="gpu" if gpu else "cpu", strength=args.strength, views=args.views,
                    dtype=amp_dtype or torch.float32, channels_last=channels_last,
                    scale=(args.crop_scale, 1.0), flip=args.flip)
    try:
        ds = data_mod.load_dataset(args.dataset, args.data_dir, synthetic_size=args.synthetic_size,
                                   synthetic_image_size=args.image_size)
        batches = data_mod.train_batches(ds, args.batch_size, seed=args.seed, rank=rank,
                                         world_size=world, workers=args.workers,
                                         size=args.image_size, dali=dali)
    except (ValueError, FileNotFoundError) as exc:  # bad data or flags: a message, not a traceback
        raise SystemExit(f"fastclr.train: {exc}") from exc
    views = None if use_dali else TorchViews(args, ds.mean, ds.std, device,
                                             amp_dtype or torch.float32, channels_last, rank)
    return ds, batches, views


def model_from_config(config: dict, num_classes: int | None = None) -> models.SimCLRModel:
    """The model a run's configuration (``run_config``, as saved in its checkpoint) describes;
    ``num_classes``: the supervised baseline's classifier width."""
    return models.build_model(
        config["backbone"], width=config["width"], cifar_stem=config["cifar_stem"] == "on",
        head_layers=config["head_layers"], proj_dim=config["proj_dim"], hidden=config["proj_hidden"],
        image_size=config["image_size"],
        num_classes=num_classes if config["loss"] == "supervised" else None)


def _build_model(args, device, channels_last, num_classes):
    try:
        model = model_from_config(run_config(args), num_classes).to(device)
    except ValueError as exc:  # a backbone that cannot take these views: a message
        raise SystemExit(f"fastclr.train: {exc}") from None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    scale = args.batch_size / 256
    peak_lr = args.base_lr * (scale if args.lr_scaling == "linear" else math.sqrt(scale))
    return model, make_optimizer(args, model, peak_lr), peak_lr


def make_optimizer(args, model, lr: float):
    """--optimizer over lars_param_groups (no weight decay on biases and norms, for all three):
    fastclr.LARS, or torch's fused SGD / AdamW, which skip a step on the device when
    ``optimizer.found_inf`` is set (optimizer_step)."""
    groups = fastclr.lars_param_groups(model, args.weight_decay)
    if args.optimizer == "lars":
        return fastclr.LARS(groups, lr=lr, momentum=args.momentum,
                            trust_coefficient=args.trust_coefficient, impl=args.optimizer_impl)
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, fused=True)
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def optimizer_step(optimizer, found_inf: torch.Tensor) -> None:
    """The step, skipped on the device (no host synchronisation) where ``found_inf`` is nonzero."""
    if isinstance(optimizer, fastclr.LARS):
        optimizer.step(found_inf=found_inf)
    else:
        optimizer.found_inf = found_inf.reshape(())  # what GradScaler hands the fused optimizers
        optimizer.step()


def setup_run(args, device, rank, world) -> Run:
    torch.manual_seed(args.seed)
    gpu = device.type == "cuda"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}.get(
        args.precision, torch.bfloat16 if gpu else None)
    channels_last = args.channels_last == "on" or (args.channels_last == "auto" and gpu)
    ds, batches, views = _load_data(args, device, rank, world, amp_dtype, channels_last)
    model, optimizer, peak_lr = _build_model(args, device, channels_last, ds.num_classes)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    resume = args.resume
    if resume == "auto":
        resume = ckpt_path if os.path.isfile(ckpt_path) else None
    state = RunState()
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    if resume:
        restore(resume, args, model, optimizer, state, len(batches), scaler)
    raw_model = model
    if world > 1 and gpu:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if gpu else None)
    run = Run(args, device, rank, world, ds, batches, model, raw_model,
              torch.compile(model) if args.compile else model, optimizer, views, amp_dtype,
              channels_last, dist.group.WORLD if world > 1 else None, state,
              DeviceSums(device, state.bad_run), None, ckpt_path, peak_lr, _StopRequest(), scaler=scaler)
    if resume and os.path.abspath(resume) == os.path.abspath(ckpt_path):
        run.last_good = state.position(run.steps_per_epoch, args.epochs)
    if run.main:
        _open_outputs(run, resumed=bool(resume))
    if args.eval_random_init and run.main and state.random_init is None:
        state.random_init = headline(run_evaluation(run, probe=True))
    return run


def _open_outputs(run: Run, *, resumed: bool) -> None:
    import yaml
    from torch.utils.tensorboard import SummaryWriter
    args = run.args
    os.makedirs(args.out, exist_ok=True)
    text = yaml.safe_dump(run_config(args), sort_keys=True)
    path = os.path.join(args.out, "config.yaml")
    write_or_exit(run, "the configuration", path, lambda: _atomic_write(path, text.encode()))
    run.writer = SummaryWriter(os.path.join(args.out, "tensorboard"), purge_step=run.state.step)
    kind = {"ntxent": "SimCLR" if args.views == 2 else f"multi-view SimCLR ({args.views} views)",
            "supcon": f"SupCon ({args.views} views, positives {args.positives})",
            "supervised": f"supervised cross-entropy baseline ({args.views} views)"}[args.loss]
    optimizer = (f"LARS impl {run.optimizer.backend(run.device)}" if args.optimizer == "lars"
                 else args.optimizer)
    print(f"fastclr {fastclr.__version__}: {kind} on {args.dataset} ({run.steps_per_epoch} "
          f"steps/epoch of {args.batch_size} images, {args.epochs} epochs), {args.backbone}"
          + (f" width {args.width}" if args.width else "")
          + f", {run.world} process(es) on {run.device}, loss impl {args.loss_impl}, {optimizer}, "
          f"augmentation {'DALI' if run.augment is None else 'torch'}, {PRECISION_NAMES[run.amp_dtype]}; "
          f"out {args.out}" + (f"; resumed {run.state.position(run.steps_per_epoch, args.epochs)}"
                               if resumed else ""), flush=True)
    print("configuration (saved as config.yaml):\n  " + text.strip().replace("\n", "\n  "), flush=True)


# --- one step ---------------------------------------------------------------------------------

def contrastive_loss(run: Run, z: torch.Tensor, labels: torch.Tensor, views: int):
    """(loss, top-1) of one step's embeddings ``z`` (the ``views`` views stacked)."""
    args = run.args
    kw = dict(impl=args.loss_impl, return_accuracy=True, process_group=run.group)
    if args.loss == "ntxent" and views == 2:
        z1, z2 = z.chunk(2)
        loss, acc = nt_xent_fused(z1, z2, args.temperature, **kw)
        return loss, acc["top1"]
    n = z.shape[0] // views
    if args.loss == "supervised":  # z: the classifier's logits for every view
        target = labels.to(run.device, non_blocking=True).repeat(views)
        loss = torch.nn.functional.cross_entropy(z, target)
        return loss, (z.detach().argmax(1) == target).float().mean()
    if args.loss == "supcon":
        ids = labels.to(run.device, non_blocking=True)
    else:  # multi-view SimCLR: an image's views share a label unique in the global batch
        ids = torch.arange(n, device=run.device) + run.rank * n
    loss, acc = supcon_fused(z, ids.repeat(views), args.temperature, positives=args.positives, **kw)
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
        micro = run.args.micro_batch or views[0].shape[0]
        out = grad_cache_backward(run.forward, views, loss_fn, micro)
    return (out[2], out[1]) if run.scaler is not None else out


# --- the loop ---------------------------------------------------------------------------------

def read_progress(run: Run, bar, clock: list) -> Stop | None:
    """The host's look at the device (one synchronisation): fold the sums into the state, log,
    and say whether to stop (a signal on any rank, or too many non-finite steps in a row)."""
    st, c = run.state, run.state.current
    loss, top1, good, bad, bad_run, signum = run.sums.read(run.stop_request.signum, run.group)
    c.loss, c.top1, c.good_steps = c.loss + loss, c.top1 + top1, c.good_steps + good
    st.bad_steps, st.bad_run = st.bad_steps + bad, bad_run
    now = time.perf_counter()
    c.seconds, st.train_time, clock[0] = c.seconds + now - clock[0], st.train_time + now - clock[0], now
    if run.main and good:
        lr = run.lr_at(st.step - 1)
        bar.set_postfix(loss=f"{loss / good:.4f}", lr=f"{lr:.3g}",
                        img_s=f"{st.batch * run.args.batch_size / max(c.seconds, 1e-9):.0f}")
        run.writer.add_scalar("train/loss", loss / good, st.step)
        run.writer.add_scalar("train/lr", lr, st.step)
    if st.bad_run >= run.args.max_bad_steps:
        return Stop("bad_steps")
    return Stop("signal", signum) if signum else None


def run_epoch(run: Run) -> Stop | None:
    """Batches ``state.batch..`` of epoch ``state.epoch``; reads the device every --log-every
    steps (checkpointing every --ckpt-every-steps) and at the end. Returns a Stop or None."""
    st, args = run.state, run.args
    bar = tqdm(total=run.steps_per_epoch, initial=st.batch, unit="step", file=sys.stderr,
               desc=f"epoch {st.epoch + 1}/{args.epochs}", dynamic_ncols=True,
               disable=not run.main or args.no_progress)
    clock = [time.perf_counter()]
    try:
        for x, labels in run.batches.epoch(st.epoch, st.batch):
            train_step(run, x, labels)
            st.step, st.batch = st.step + 1, st.batch + 1
            bar.update(1)
            if st.batch == run.steps_per_epoch:
                break
            ckpt_now = args.ckpt_every_steps and st.step % args.ckpt_every_steps == 0
            if st.step % args.log_every == 0 or ckpt_now:
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
    st, args, c = run.state, run.args, run.state.current
    row = {"epoch": st.epoch + 1, "step": st.step, "loss": c.loss / max(c.good_steps, 1),
           "contrastive_top1": c.top1 / max(c.good_steps, 1), "lr": run.lr_at(st.step),
           "images_per_sec": run.steps_per_epoch * args.batch_size / c.seconds if c.seconds > 0 else None,
           "bad_steps": st.bad_steps, "elapsed_s": st.train_time}
    st.epoch, st.batch, st.current = st.epoch + 1, 0, EpochSums()
    last = st.epoch == args.epochs
    if run.main and args.eval_every and st.epoch % args.eval_every == 0 and not last:
        row["knn_top1"] = run_evaluation(run, probe=False)["knn"]["top1"]
    st.history.append(row)
    if run.main:
        save_metrics(run)
        for k in ("loss", "contrastive_top1", "images_per_sec", "knn_top1"):
            if row.get(k) is not None:
                run.writer.add_scalar(f"epoch/{k}", row[k], row["epoch"])
    if st.epoch % args.ckpt_every == 0 or last or (
            args.ckpt_every_steps and st.step % args.ckpt_every_steps == 0):
        checkpoint(run)


def train(run: Run) -> Stop:
    """Epochs until the last one or a stop; a stopped run is checkpointed where it stopped."""
    with run.stop_request:
        while run.state.epoch < run.args.epochs:
            stop = run_epoch(run)
            if stop is None or run.state.batch == run.steps_per_epoch:
                end_epoch(run)
            if stop:
                checkpoint(run)
                return stop
    return Stop("done")


def finish(run: Run, stop: Stop) -> dict | None:
    """Exit with a message on a stop; else the final evaluation, the outputs and the JSON line."""
    args, st = run.args, run.state
    where = st.position(run.steps_per_epoch, args.epochs)
    if stop.reason != "done":
        if stop.reason == "bad_steps":
            code, msg = 3, (f"stopping: {st.bad_run} steps in a row had a non-finite loss "
                            f"({st.bad_steps} in all), {where}; checkpoint {run.ckpt_path}. Lower "
                            "--base-lr or raise --temperature, then --resume")
        else:
            code, msg = 128 + stop.signum, (
                f"stopped by {signal.Signals(stop.signum).name} {where}; checkpoint {run.ckpt_path}; "
                f"continue with --resume {run.ckpt_path}")
        if run.main:
            print(msg, file=sys.stderr, flush=True)
        raise SystemExit(code)
    result = None
    if run.main:
        with _exit_on_signal(f"during the final evaluation (training is complete and saved in "
                             f"{run.ckpt_path}); --resume {run.ckpt_path} redoes the evaluation"):
            final = final_evaluation(run)
        result = _write_results(run, headline(final))
        print(json.dumps(result), flush=True)
    if run.world > 1:
        dist.barrier()
    return result


def _write_results(run: Run, final: dict) -> dict:
    args, st = run.args, run.state
    if st.history:
        st.history[-1]["knn_top1"] = final["knn_top1"]
        save_metrics(run)
    run.writer.add_scalar("eval/knn_top1", final["knn_top1"], st.step)
    run.writer.add_scalar("eval/linear_top1", final["linear_top1"], st.step)
    run.writer.close()
    path = os.path.join(args.out, "curves.png")
    write_or_exit(run, "the curves", path, lambda: plot_curves(path, st.history, final))
    result = {
        **final,
        "images_per_sec": (st.step * args.batch_size / st.train_time) if st.train_time > 0 else None,
        "epochs": args.epochs, "steps": st.step, "checkpoint": os.path.abspath(run.ckpt_path),
        "final_loss": st.history[-1]["loss"] if st.history else None, "bad_steps": st.bad_steps,
        "train_time_s": st.train_time, "dataset": args.dataset, "backbone": args.backbone,
        "width": args.width, "batch_size": args.batch_size, "loss": args.loss, "views": args.views,
        "world_size": run.world, "device": str(run.device), "out": os.path.abspath(args.out),
    }
    if st.random_init is not None:
        result["random_init"] = st.random_init
    return result


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    device, rank, world = setup_distributed(args.device)
    try:
        if rank == 0:
            check_output_folder(args.out)
        run = setup_run(args, device, rank, world)
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
    config = run_config(run.args)
    s = eval_run.settings_of(config, progress=False)
    return eval_run.evaluate_model(run.raw_model, run.ds, config, s, ("knn", "linear") if probe else ("knn",),
                                   run.device, plots=plots, sweep=False, dtype=run.amp_dtype,
                                   channels_last=run.channels_last, workers=run.args.workers)


def final_evaluation(run: Run) -> dict:
    """The end of training's evaluation, written as python -m fastclr.evaluate writes its own:
    <out>/eval.json, eval.md and the linear probe's confusion plot (a refused write: write_or_exit)."""
    config, path = run_config(run.args), os.path.join(run.args.out, "eval.json")
    return eval_run.evaluate_into(
        run.args.out, "eval", lambda plots: run_evaluation(run, probe=True, plots=plots),
        lambda results: eval_run.make_report(config, run.state.state_dict(), run.ckpt_path, run.ds,
                                             eval_run.settings_of(config), results, ("knn", "linear"), False),
        guard=lambda write: write_or_exit(run, "the evaluation results", path, write))["results"]


def headline(results: dict) -> dict:
    """The evaluation's figures as the JSON line names them: knn_top1, knn_top5, linear_top1, ..."""
    return {f"{p}_{k}": results[p][k] for p in ("knn", "linear") if p in results for k in ("top1", "top5")}


# --- checkpoints ------------------------------------------------------------------------------

def _atomic_write(path: str, payload) -> None:
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


def checkpoint_bytes(state: dict) -> bytes:
    """``torch.save(state)`` in memory: the file's size is known before it is written, and a
    failed write is the file system's OSError, not torch's "unexpected pos"."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(path: str, state: dict) -> None:
    """``torch.save(state)`` to ``path``, atomically."""
    _atomic_write(path, checkpoint_bytes(state))


def checkpoint(run: Run) -> None:
    if run.main:
        data = checkpoint_bytes({
            "format": CKPT_FORMAT, "config": run_config(run.args), "model": run.raw_model.state_dict(),
            "optimizer": run.optimizer.state_dict(), "rng": _rng_state(), "run": run.state.state_dict(),
            "scaler": run.scaler.state_dict() if run.scaler is not None else None})
        write_or_exit(run, "the checkpoint", run.ckpt_path, lambda: _atomic_write(run.ckpt_path, data),
                      len(data))
        run.last_good = run.state.position(run.steps_per_epoch, run.args.epochs)
    if run.world > 1:
        dist.barrier()


def write_or_exit(run: Run, what: str, path: str, write, size: int | None = None):
    """``write()``; if the file system refuses it (no space, no permission, a read-only folder),
    the run ends with exit status 1 and one message: what could not be written and why, the
    space it needed, the last good checkpoint and how to continue. The writes are atomic, so
    nothing partial or temporary is left."""
    try:
        return write()
    except OSError as exc:
        why = exc.strerror or str(exc)
        need = f" ({size / 2**20:.1f} MiB needed)" if size else ""
        if run.last_good:
            then = (f"The last good checkpoint is {run.ckpt_path}, {run.last_good}: once {what} can be "
                    "written there (free space, or fix the folder), the same command with --resume "
                    "auto continues from it.")
        else:
            then = "No checkpoint has been written yet: rerun once the folder can be written."
        raise SystemExit(f"fastclr.train: could not write {what} {path}: {why}{need}. {then}") from None


def check_output_folder(out: str) -> None:
    """Refuse, before training, an output folder that cannot be made or written."""
    probe = os.path.join(out, f".fastclr-write-test.{os.getpid()}")
    try:
        _atomic_write(probe, b"0")  # makes the folder; leaves nothing behind when it fails
        os.unlink(probe)
    except OSError as exc:
        raise SystemExit(f"fastclr.train: cannot write to the output folder {out}: "
                         f"{exc.strerror or exc}; give another --out") from None


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


def _check_same_run(path: str, theirs: dict, args, state: RunState, steps_per_epoch: int) -> None:
    theirs = {**RUN_DEFAULTS_BEFORE, **theirs}
    diff = [f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {getattr(args, k)!r} here"
            for k in RUN_DEFINING if theirs.get(k) != getattr(args, k)]
    if diff:
        raise SystemExit(f"--resume: {path} belongs to a different run: " + "; ".join(diff))
    changed = [k for k in SCHEDULE if theirs.get(k) != getattr(args, k)]
    if not changed:
        return
    was = ", ".join(f"--{k.replace('_', '-')} {theirs.get(k)}" for k in SCHEDULE)
    if state.epoch >= theirs["epochs"]:
        raise SystemExit(
            f"--resume: {path} is a finished run ({was}): its learning rate has decayed to 0 on its "
            f"cosine schedule, and resuming with {', '.join(changed)} changed would jump it back up. "
            "To train longer, start a new run with the new --epochs (another --out)")
    old = lr_factor(state.step, theirs["epochs"] * steps_per_epoch,
                    int(round(theirs["warmup_epochs"] * steps_per_epoch)))
    new = lr_factor(state.step, args.epochs * steps_per_epoch,
                    int(round(args.warmup_epochs * steps_per_epoch)))
    raise SystemExit(
        f"--resume: {path} was trained with {was}, which fix the learning-rate schedule; with the "
        f"new values the lr would jump from {old:.3g} to {new:.3g} x peak at step {state.step}. "
        "Resume with the old values, or start a new run")


def restore(path: str, args, model, optimizer, state: RunState, steps_per_epoch: int,
            scaler=None) -> None:
    """Load a checkpoint of the same run into the model, optimizer, RNG and run state."""
    ckpt = read_checkpoint(path)
    run_state = RunState()
    run_state.load_state_dict(ckpt["run"])
    _check_same_run(path, ckpt["config"], args, run_state, steps_per_epoch)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise SystemExit(f"--resume: {path} does not fit this model/optimizer: {exc}") from exc
    _set_rng_state(ckpt["rng"])
    if scaler is not None and ckpt.get("scaler"):  # fp16's loss scale, where the run had one
        scaler.load_state_dict(ckpt["scaler"])
    state.load_state_dict(ckpt["run"])


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- signals ----------------------------------------------------------------------------------

class _StopRequest:
    """While entered, SIGTERM / SIGINT set ``signum``; the loop reads it every --log-every steps,
    then saves and stops."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        self.signum = signum

    def __enter__(self):
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


class _exit_on_signal:
    """While entered, SIGTERM / SIGINT print what happened (``what``) and exit 128 + signal."""

    def __init__(self, what: str):
        self.what = what

    def __call__(self, signum, frame):
        print(f"stopped by {signal.Signals(signum).name} {self.what}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def __enter__(self):
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


# --- outputs ----------------------------------------------------------------------------------

METRIC_FIELDS = ("epoch", "step", "loss", "contrastive_top1", "lr", "images_per_sec", "knn_top1",
                 "bad_steps", "elapsed_s")


def save_metrics(run: Run) -> None:
    """<out>/metrics.csv from the run's history (a write failure ends the run: write_or_exit)."""
    path = os.path.join(run.args.out, "metrics.csv")
    write_or_exit(run, "the metrics", path, lambda: write_metrics_csv(path, run.state.history))


def write_metrics_csv(path: str, history: list) -> None:
    """The whole history, rewritten atomically, so a resumed run never repeats or loses a row."""
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_FIELDS})
    _atomic_write(path, text.getvalue().encode())


def plot_curves(path: str, history: list, final: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ep = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(ep, [r["loss"] for r in history])
    ax1.set(xlabel="epoch", ylabel="contrastive loss", title="training loss")
    ax2.plot(ep, [r["contrastive_top1"] for r in history], label="contrastive top-1 (train batch)")
    knn = [(r["epoch"], r["knn_top1"]) for r in history if r.get("knn_top1") is not None]
    if knn:
        ax2.plot(*zip(*knn), "o-", label="kNN top-1 (held out)")
    if final.get("linear_top1") is not None:
        ax2.axhline(final["linear_top1"], ls="--", c="k", label="linear probe top-1 (held out)")
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    ax2.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(path, png.getvalue())


if __name__ == "__main__":
    main()
