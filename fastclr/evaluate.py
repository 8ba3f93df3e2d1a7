"""``python -m fastclr.evaluate RUN_DIR_OR_CHECKPOINT``: kNN, linear probe, k-means, few-label
fine-tuning and t-SNE of a saved run -- the entry point of ``fastclr.app.eval_run`` (``--help``
lists every flag). Needs the ``train`` extra."""
from fastclr.app import run_command


def main(argv=None):
    return run_command("evaluate", "fastclr.app.eval_run", argv)


if __name__ == "__main__":
    main()
