"""The training application, one module per responsibility, each importing only the ones below
it (ARCHITECTURE.md has the layers):

- train.py: ``python -m fastclr.train``, the loop (the run's state, one step, one epoch, finish)
- eval_run.py: ``python -m fastclr.evaluate``, a model through evaluate.py's protocols
- export.py: ``python -m fastclr.export``, ``load_backbone``
- config.py: the run's configuration, one typed ``RunConfig`` (flags > file > dataset defaults)
- checkpoint.py: checkpoint I/O and atomic writes; metrics.py: the step's sums, metrics.csv, curves
- runtime.py: device and torch.distributed set-up, signals
- data.py: datasets and batch sources; sampling.py: ``BatchOrder``, the one batch order
- augment.py: the batched torch augmentation; dali.py: the NVIDIA DALI pipeline
- models.py: backbones and heads; configs/*.yaml: the shipped recipes

It uses the library (``fastclr``), never the reverse, and needs the ``train`` extra:
``pip install "fastclr[train]"``. This file stays light (no import of its modules or of the
extra) so that the entry points can say what is missing."""

# module -> the distribution that provides it, for the message when the extra is missing
TRAIN_REQUIREMENTS = {"torchvision": "torchvision", "numpy": "numpy", "tqdm": "tqdm",
                      "sklearn": "scikit-learn", "scipy": "scipy", "yaml": "pyyaml", "tensorboard": "tensorboard",
                      "matplotlib": "matplotlib", "safetensors": "safetensors"}


def missing_requirements() -> list:
    """The train extra's distributions that cannot be imported here."""
    import importlib.util
    return [dist for module, dist in TRAIN_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def run_command(command: str, module: str, argv=None):
    """``python -m fastclr.<command>``: ``module``'s ``main(argv)``, or -- when the extra is not
    installed -- exit 1 naming what to install."""
    import importlib
    import sys
    missing = missing_requirements()
    if missing:
        sys.exit(f"python -m fastclr.{command} needs the training extra, which is not installed here "
                 f"(missing: {', '.join(missing)}): pip install \"fastclr[train]\"")
    return importlib.import_module(module).main(argv)
