"""The training application: ``python -m fastclr.train`` (train.py), its datasets (data.py),
augmentation pipelines (augment.py: DALI and batched torch), backbones (models.py), evaluation
(evaluate.py: the protocols; eval_run.py: ``python -m fastclr.evaluate``), the export
(export.py: ``python -m fastclr.export``, ``load_backbone``) and the shipped recipes
(configs/*.yaml). It uses the library (``fastclr``), never
the reverse, and needs the ``train`` extra: ``pip install "fastclr[train]"``."""

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
