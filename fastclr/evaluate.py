"""``python -m fastclr.evaluate RUN_DIR_OR_CHECKPOINT``: kNN, linear probe, k-means, few-label
fine-tuning and t-SNE of a saved run -- the entry point of ``fastclr.app.eval_run`` (``--help``
lists every flag). Needs the ``train`` extra."""
import sys

from fastclr.app import missing_requirements


def main(argv=None):
    missing = missing_requirements()
    if missing:
        sys.exit(f"python -m fastclr.evaluate needs the training extra, which is not installed here "
                 f"(missing: {', '.join(missing)}): pip install \"fastclr[train]\"")
    from fastclr.app.eval_run import main as eval_main
    return eval_main(argv)


if __name__ == "__main__":
    main()
