"""The run's configuration: one typed object, ``RunConfig``, built once.

Its fields are the flags of ``python -m fastclr.train`` (the parser is generated from them), and
a value comes from, in this order: the command line, a ``--config`` YAML file (keys named as the
fields or the flags), the dataset's defaults (``DATASET_DEFAULTS``), the field's default.
``to_dict()`` is what config.yaml saves and what a checkpoint records; ``from_dict`` reads it
back (a key a checkpoint of an older fastclr lacks takes the field's default, which is what that
version meant by it).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field

from fastclr import optim
from fastclr.loss import IMPLS as LOSS_IMPLS

from . import models
from .data import DATASETS

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
OPTIMIZERS = ("lars", "sgd", "adamw")
ADAMW_BASE_LR = 1e-3  # --base-lr's default with --optimizer adamw (the datasets' are for LARS/SGD)
# A checkpoint may only resume a run that agrees on these ...
RUN_DEFINING = ("dataset", "backbone", "width", "cifar_stem", "head_layers", "proj_dim",
                "proj_hidden", "batch_size", "image_size", "seed", "loss", "views", "positives",
                "optimizer", "validation")
# ... and on these, which fix the learning-rate schedule (warm-up, then cosine to 0 at the end).
SCHEDULE = ("epochs", "warmup_epochs")

# Per-dataset defaults of the fields left unset (None) on the command line and in the file.
DATASET_DEFAULTS = {
    "digits": dict(epochs=50, batch_size=256, image_size=16, width=16, temperature=0.15,
                   crop_scale=0.3, flip=0.0, strength=0.5, base_lr=0.5, warmup_epochs=5,
                   eval_every=10, knn_k=20),
    # 28 px grey photographs: views at the native size (a 16 px view loses the texture that tells
    # a shirt from a T-shirt), the CIFAR stem, no blur (below 96 px), flips (clothes are
    # symmetric), crops down to a fifth; colour jitter on grey images is brightness and contrast
    # only (saturation and hue change nothing where the channels are equal). docs/training.md.
    "fashion-mnist": dict(epochs=7, batch_size=512, image_size=28, width=16, temperature=0.2,
                          crop_scale=0.2, flip=0.5, strength=0.5, base_lr=0.5, warmup_epochs=1,
                          eval_every=0, knn_k=20),
    "cifar10": dict(epochs=200, batch_size=512, image_size=32, width=64, temperature=0.5,
                    crop_scale=0.08, flip=0.5, strength=0.5, base_lr=0.3, warmup_epochs=10,
                    eval_every=0, knn_k=200),
    "imagefolder": dict(epochs=100, batch_size=4096, image_size=224, width=64, temperature=0.1,
                        crop_scale=0.08, flip=0.5, strength=1.0, base_lr=0.3, warmup_epochs=10,
                        eval_every=0, knn_k=200),
    "synthetic": dict(epochs=2, batch_size=256, image_size=32, width=64, temperature=0.5,
                      crop_scale=0.08, flip=0.5, strength=0.5, base_lr=0.3, warmup_epochs=0,
                      eval_every=0, knn_k=200),
}
DATASET_DEFAULTS["cifar100"] = DATASET_DEFAULTS["cifar10"]
# An unlabeled folder: on a GPU SimCLR's ImageNet recipe; on a CPU views and a network small
# enough to train on a thousand images in minutes.
DATASET_DEFAULTS["folder"] = dict(epochs=30, batch_size=128, image_size=64, width=32, temperature=0.2,
                                  crop_scale=0.2, flip=0.5, strength=0.5, base_lr=0.3,
                                  warmup_epochs=3, eval_every=0, knn_k=200)
GPU_DEFAULTS = {"folder": DATASET_DEFAULTS["imagefolder"]}


def dataset_defaults(dataset: str, device: str) -> dict:
    """The defaults of ``dataset`` on ``device`` ("auto": a GPU when one is visible)."""
    import torch
    gpu = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return GPU_DEFAULTS.get(dataset, DATASET_DEFAULTS[dataset]) if gpu else DATASET_DEFAULTS[dataset]


def shipped_configs() -> list:
    """The names of the recipes shipped with fastclr (``--config NAME``)."""
    return sorted(f[:-len(".yaml")] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml"))


def flag(default=None, help: str = "", *, choices=None, metavar=None, recorded: bool = True):
    """A field that is also a flag: ``help``/``choices``/``metavar`` as argparse's; default None
    on a per-dataset field means "the dataset's"; ``recorded=False``: a flag of the command, not
    part of the run (not saved, not compared on resume)."""
    return field(default=default, metadata=dict(help=help, choices=choices, metavar=metavar,
                                                recorded=recorded))


@dataclass
class RunConfig:
    """Every setting of a training run (the flags of ``python -m fastclr.train``)."""
    dataset: str = flag("digits", "the training data", choices=DATASETS)
    data_dir: str | None = flag(None, "cifar10/100: the folder holding the python archive; "
                                      "fashion-mnist: the folder holding its four IDX files, or "
                                      "torchvision's root (default: where they are installed); "
                                      "imagefolder: the folder with train/ and val/; folder: any "
                                      "folder of images (no labels)")
    validation: int = flag(0, "datasets held in memory (digits, fashion-mnist, cifar, synthetic): "
                              "hold out this many training images "
                              "(stratified, always the same ones) and evaluate on them instead of "
                              "the test split, to tune settings without looking at the test images")
    val_dir: str | None = flag(None, "a labelled folder (one sub-folder per class) to evaluate a "
                                     "--dataset folder run on: each class split in two by a seeded "
                                     "order, half kNN's bank and the probe's training set, half the test")
    out: str | None = flag(None, "output folder: checkpoint.pt, config.yaml, metrics.csv, "
                                 "tensorboard/, curves.png (default: runs/<dataset>)")
    epochs: int | None = flag(None, "passes over the training set")
    batch_size: int | None = flag(None, "global batch (images; the loss sees V x as many views)")
    image_size: int | None = flag(None, "side of the augmented views")
    backbone: str = flag("resnet18", "the encoder: any torchvision classification model by name "
                                     "(resnet18, mobilenet_v3_small, efficientnet_b0, convnext_tiny, "
                                     "vit_b_16, ...); its classifier is replaced by the head")
    width: int | None = flag(None, "ResNets only: channels of the first stage (64 = the standard "
                                   "network)")
    cifar_stem: str = flag("auto", "the small-image stem: ResNets a 3x3 stride-1 conv1 without "
                                   "max-pool, networks with a 3x3 stride-2 first convolution that "
                                   "stride 1 (auto: on for views of 64 px and smaller where it applies)",
                           choices=("auto", "on", "off"))
    head_layers: int = flag(2, "projection-head layers", choices=(2, 3))
    proj_hidden: int | None = flag(None, "projection head's hidden width (default: the backbone's "
                                         "feature width)")
    proj_dim: int = flag(128, "projection (embedding) dimension")
    loss: str = flag("ntxent", "ntxent: SimCLR (views of the same image are positives); supcon: "
                               "supervised contrastive (images of the same class are positives); "
                               "supervised: the baseline, cross-entropy on the labels through a "
                               "linear classifier in place of the projection head (same augmentation, "
                               "epochs and optimizer)", choices=("ntxent", "supcon", "supervised"))
    views: int = flag(2, "augmented views per image (> 2: multi-view)")
    micro_batch: int | None = flag(None, "gradient caching: forward at most this many images (with "
                                         "their views) at a time on each process, the loss still on "
                                         "the whole batch (exact gradients without BatchNorm; with "
                                         "it, statistics per micro-batch). Default: the whole batch "
                                         "at once")
    positives: str = flag("mean", "with several positives per row: mean of their logits (SupCon's "
                                  "L_out) or logsumexp (L_in, solo-learn's multi-positive SimCLR)",
                          choices=("mean", "sum"))
    temperature: float | None = flag(None, "the loss's temperature tau")
    optimizer: str = flag("lars", "lars (fastclr.LARS), sgd (momentum) or adamw (torch's fused "
                                  "ones); weight decay never on biases and norms, for all three",
                          choices=OPTIMIZERS)
    base_lr: float | None = flag(None, "lr = base_lr x batch/256 (linear) or x sqrt(batch/256) "
                                       f"(adamw's default: {ADAMW_BASE_LR})")
    lr_scaling: str = flag("linear", "see --base-lr", choices=("linear", "sqrt"))
    warmup_epochs: float | None = flag(None, "linear warm-up, then cosine decay to 0 (a tenth of "
                                             "the run if not shorter than --epochs)")
    weight_decay: float = flag(1e-6, "weight decay (not on biases and norms)")
    momentum: float = flag(0.9, "LARS's and SGD's momentum")
    trust_coefficient: float = flag(0.001, "LARS's trust coefficient (eta)")
    loss_impl: str = flag("auto", "the loss kernels' backend", choices=LOSS_IMPLS)
    optimizer_impl: str = flag("auto", "the LARS step's backend", choices=optim.IMPLS)
    augment: str = flag("auto", "auto: DALI on a GPU when it is installed, else the torch "
                                "augmentation (faster than DALI's CPU mode on small images)",
                        choices=("auto", "dali", "torch"))
    crop_scale: float | None = flag(None, "smallest crop area fraction of the random resized crop")
    flip: float | None = flag(None, "horizontal flip probability")
    strength: float | None = flag(None, "colour-jitter strength")
    precision: str = flag("auto", "auto: bf16 autocast on a GPU and on a CPU with native bf16 dot "
                                  "products (AVX512-BF16, AMX), fp32 on other CPUs (where bf16 is "
                                  "emulated, slowly); fp16: float16 autocast with loss scaling (GPUs "
                                  "without bfloat16: V100, T4)",
                          choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: str = flag("auto", "auto: on where --precision auto picks bf16 (oneDNN's CPU "
                                      "channels-last kernels are faster but not deterministic: no "
                                      "exact resume)", choices=("auto", "on", "off"))
    deterministic: bool = flag(False, "on a CPU, --precision auto and --channels-last auto mean fp32 "
                                      "and contiguous on every CPU: a resumed run ends bit-identical "
                                      "to an uninterrupted one", recorded=False)
    compile: bool = flag(False, "torch.compile the model")
    device: str = flag("auto", "auto | cpu | cuda")
    workers: int = flag(4, "image-folder decoding processes")
    synthetic_size: int = flag(4096, "images of --dataset synthetic")
    eval_every: int | None = flag(None, "kNN every E epochs (0: only at the end)")
    knn_k: int | None = flag(None, "kNN neighbours (about a class's share of a small training set; "
                                    "200 on large ones, as Wu et al. 2018 on ImageNet)")
    knn_temperature: float = flag(0.1, "kNN vote temperature")
    probe_epochs: int = flag(100, "linear-probe epochs")
    eval_random_init: bool = flag(False, "also evaluate the model at random initialisation")
    log_every: int = flag(10, "read the loss and the stop flags every N steps (the only host "
                              "synchronisations)")
    ckpt_every: int = flag(1, "checkpoint every E epochs")
    ckpt_every_steps: int = flag(0, "also checkpoint every N steps (0: off)")
    resume: str | None = flag(None, "a checkpoint to continue from, or 'auto': <out>/checkpoint.pt "
                                    "if it exists", recorded=False)
    max_bad_steps: int = flag(20, "stop (after saving) when this many steps in a row had a "
                                  "non-finite loss")
    max_bad_files: float = flag(0.05, "--dataset folder: stop when more than this fraction of the "
                                      "files read cannot be decoded (they are skipped until then)")
    rescan: bool = flag(False, "--dataset folder with --resume: train on the folder as it is now "
                               "when its files changed since the run began", recorded=False)
    seed: int = flag(0, "seeds the model, the data order and the augmentation")
    no_progress: bool = flag(False, "no progress bar")

    def to_dict(self) -> dict:
        """The run's record: every recorded field (what config.yaml and a checkpoint hold)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["recorded"]}

    @classmethod
    def from_dict(cls, record: dict) -> RunConfig:
        """A record ``to_dict`` wrote (by this or an older fastclr); unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls) if f.metadata["recorded"]}
        unknown = sorted(set(record) - names)
        if unknown:
            raise ValueError(f"a run configuration with unknown keys {unknown} (written by a newer "
                             "fastclr?)")
        return cls(**record)

    def build_model(self, num_classes: int | None = None) -> models.SimCLRModel:
        """The model this configuration describes; ``num_classes``: the supervised baseline's
        classifier width."""
        return models.build_model(
            self.backbone, width=self.width, cifar_stem=self.cifar_stem == "on",
            head_layers=self.head_layers, proj_dim=self.proj_dim, hidden=self.proj_hidden,
            image_size=self.image_size,
            num_classes=num_classes if self.loss == "supervised" else None)

    @property
    def peak_lr(self) -> float:
        """base_lr scaled by the batch (linear or square-root scaling, from 256 images)."""
        scale = self.batch_size / 256
        return self.base_lr * (scale if self.lr_scaling == "linear" else math.sqrt(scale))

    def lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """The schedule at ``step`` as a fraction of the peak learning rate."""
        return lr_factor(step, self.epochs * steps_per_epoch,
                         int(round(self.warmup_epochs * steps_per_epoch)))


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_AT_LEAST_1 = ("epochs", "batch_size", "image_size", "width", "proj_dim", "knn_k", "ckpt_every",
               "max_bad_steps", "synthetic_size", "log_every", "proj_hidden", "micro_batch")
_POSITIVE = ("temperature", "base_lr", "knn_temperature", "trust_coefficient")
_NON_NEGATIVE = ("eval_every", "probe_epochs", "warmup_epochs", "weight_decay", "momentum",
                 "workers", "ckpt_every_steps", "validation")


def field_type(name: str) -> type:
    """The Python type of field ``name`` (its annotation without ``| None``)."""
    return _TYPES[_FIELDS[name].type.split(" |")[0]]


# --- the command line -----------------------------------------------------------------------

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


def build_parser(description: str = "") -> argparse.ArgumentParser:
    """``python -m fastclr.train``'s parser: ``--config``, then one flag per field."""
    p = argparse.ArgumentParser(prog="python -m fastclr.train", description=description,
                                formatter_class=_Help)
    p.add_argument("--config", metavar="FILE.yaml|NAME",
                   help="a YAML file of flags (keys as the flags' names), or a shipped recipe's "
                        f"name ({', '.join(shipped_configs())}); flags given here override it")
    for name, f in _FIELDS.items():
        kind, meta = field_type(name), f.metadata
        kw = dict(help=meta["help"], default=f.default)
        if kind is bool:
            kw["action"] = "store_true"
        else:
            kw.update(type=None if kind is str else kind, choices=meta["choices"], metavar=meta["metavar"])
        p.add_argument("--" + name.replace("_", "-"), **kw)
    return p


def parse_args(argv=None, description: str = "") -> RunConfig:
    """The run's configuration from a command line: flags > --config FILE > per-dataset defaults."""
    parser = build_parser(description)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_config(known.config))
    values = vars(parser.parse_args(argv))
    del values["config"]
    return resolve(RunConfig(**values), parser.error)


def resolve(config: RunConfig, error) -> RunConfig:
    """Fill what was left to the dataset (and the other derived defaults), then check every
    value; ``error(message)`` reports a bad one (argparse's: exit 2)."""
    try:
        models.check_backbone_name(config.backbone)
    except ValueError as exc:
        error(str(exc))
    if config.width is not None and config.backbone not in models.RESNETS:
        error(f"--width applies to the ResNets ({', '.join(models.RESNETS)}), not to "
              f"{config.backbone}")
    if config.optimizer == "adamw" and config.base_lr is None:
        config.base_lr = ADAMW_BASE_LR
    if config.dataset == "folder" and config.loss != "ntxent":
        error(f"--loss {config.loss} needs labels; --dataset folder has none (use --dataset imagefolder "
              "for class folders)")
    for key, value in dataset_defaults(config.dataset, config.device).items():
        if getattr(config, key) is None and not (key == "width" and config.backbone not in models.RESNETS):
            setattr(config, key, value)
    if config.out is None:
        config.out = os.path.join("runs", config.dataset)
    if config.cifar_stem == "auto":
        small = config.image_size <= 64 and models.cifar_stem_applies(config.backbone)
        config.cifar_stem = "on" if small else "off"
    if config.warmup_epochs >= config.epochs:  # a short run: a tenth of it
        config.warmup_epochs = 0.1 * config.epochs
    _check(config, error)
    return config


def _check(config: RunConfig, error) -> None:
    def bad(name, rule):
        error(f"--{name.replace('_', '-')} must be {rule}, got {getattr(config, name)}")
    for name in _AT_LEAST_1:
        if getattr(config, name) is not None and getattr(config, name) < 1:
            bad(name, ">= 1")
    for name in _POSITIVE:
        if not getattr(config, name) > 0:
            bad(name, "> 0")
    for name in _NON_NEGATIVE:
        if getattr(config, name) < 0:
            bad(name, ">= 0")
    if config.views < 2:
        bad("views", ">= 2 (a contrastive loss needs two views of an image)")
    if not 0 < config.crop_scale <= 1:
        bad("crop_scale", "in (0, 1]")
    if not 0 <= config.flip <= 1:
        bad("flip", "a probability")
    if not 0 <= config.max_bad_files <= 1:
        bad("max_bad_files", "a fraction in [0, 1]")


# --- configuration files --------------------------------------------------------------------

def config_path(name_or_path: str) -> str:
    """``--config``'s file: a path as given, or a shipped recipe's name (``digits``)."""
    if os.path.exists(name_or_path) or os.sep in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return name_or_path
    if name_or_path in shipped_configs():
        return os.path.join(CONFIG_DIR, name_or_path + ".yaml")
    raise SystemExit(f"--config: {name_or_path!r} is neither a file nor a shipped recipe "
                     f"({', '.join(shipped_configs())})")


def load_config(path: str) -> dict:
    """A YAML mapping of field names (``batch_size`` or ``batch-size``) to values, checked as the
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
    settable = [name for name, f in _FIELDS.items() if f.metadata["recorded"]]
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in settable:
            near = difflib.get_close_matches(name, settable, n=1)
            raise SystemExit(f"--config: {path}: unknown key {key!r}"
                             + (f" (did you mean {near[0]!r}?)" if near else ""))
        out[name] = _file_value(name, value, f"--config: {path}: {key}")
    return out


def _file_value(name: str, value, where: str):
    f, kind = _FIELDS[name], field_type(name)
    if value is None:
        if f.default is not None:
            raise SystemExit(f"{where} cannot be null")
        return None
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise SystemExit(f"{where} must be {kind.__name__}, got {value!r}")
    choices = f.metadata["choices"]
    if choices is not None and value not in choices:
        raise SystemExit(f"{where} must be one of {list(choices)}, got {value!r}")
    return value
