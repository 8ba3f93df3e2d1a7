"""``python -m fastclr.embed RUN_DIR_OR_CHECKPOINT FOLDER --out embeddings.npz``: every image under
FOLDER through a trained run's backbone and head -- the entry point of ``fastclr.app.embed``
(``--help`` lists every flag; ``fastclr.app.embed.embed_folder`` for use from Python). Needs the
``train`` extra."""
from fastclr.app import run_command


def main(argv=None):
    return run_command("embed", "fastclr.app.embed", argv)


if __name__ == "__main__":
    main()
