"""``python -m fastclr.train``: SimCLR pretraining and evaluation -- the entry point of the training
application, ``fastclr.app.train`` (``--help`` lists every flag). Needs the ``train`` extra."""
from fastclr.app import run_command


def main(argv=None):
    return run_command("train", "fastclr.app.train", argv)


if __name__ == "__main__":
    main()
