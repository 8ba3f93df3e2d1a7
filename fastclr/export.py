"""``python -m fastclr.export RUN_DIR_OR_CHECKPOINT --out backbone.pt [--format safetensors]``: the
trained backbone alone, loadable strictly into torchvision -- the entry point of
``fastclr.app.export``. Needs the ``train`` extra."""
import sys

from fastclr.app import missing_requirements


def main(argv=None):
    missing = missing_requirements()
    if missing:
        sys.exit(f"python -m fastclr.export needs the training extra, which is not installed here "
                 f"(missing: {', '.join(missing)}): pip install \"fastclr[train]\"")
    from fastclr.app.export import main as export_main
    return export_main(argv)


if __name__ == "__main__":
    main()
