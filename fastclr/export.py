"""``python -m fastclr.export RUN_DIR_OR_CHECKPOINT --out backbone.pt [--format safetensors]``: the
trained backbone alone, loadable strictly into torchvision -- the entry point of
``fastclr.app.export``. Needs the ``train`` extra."""
from fastclr.app import run_command


def main(argv=None):
    return run_command("export", "fastclr.app.export", argv)


if __name__ == "__main__":
    main()
