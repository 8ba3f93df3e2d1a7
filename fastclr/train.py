"""``python -m fastclr.train``: SimCLR pretraining and evaluation -- the entry point of the training
application, ``fastclr.app.train`` (``--help`` lists every flag). Needs the ``train`` extra."""
import sys

from fastclr.app import missing_requirements


def main(argv=None):
    missing = missing_requirements()
    if missing:
        sys.exit(f"python -m fastclr.train needs the training extra, which is not installed here "
                 f"(missing: {', '.join(missing)}): pip install \"fastclr[train]\"")
    from fastclr.app.train import main as train_main
    return train_main(argv)


if __name__ == "__main__":
    main()
