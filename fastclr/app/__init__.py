"""The training application: ``python -m fastclr.train`` (train.py), its datasets (data.py),
augmentation pipelines (augment.py: DALI and batched torch), backbones (models.py), evaluation
(evaluate.py) and the shipped recipes (configs/*.yaml). It uses the library (``fastclr``), never
the reverse, and needs the ``train`` extra: ``pip install "fastclr[train]"``."""

# module -> the distribution that provides it, for the message when the extra is missing
TRAIN_REQUIREMENTS = {"torchvision": "torchvision", "numpy": "numpy", "tqdm": "tqdm",
                      "sklearn": "scikit-learn", "scipy": "scipy", "yaml": "pyyaml", "tensorboard": "tensorboard",
                      "matplotlib": "matplotlib", "safetensors": "safetensors"}


def missing_requirements() -> list:
    """The train extra's distributions that cannot be imported here."""
    import importlib.util
    return [dist for module, dist in TRAIN_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
