"""Location of the corpus the project ships."""

from pathlib import Path


DEFAULT_CORPUS_NAME = "tinyshakespeare"
"""Dataset name the recipes record (model cards, metrics) when they train on the shipped corpus."""


def default_corpus_path() -> Path:
    """Returns the path of the shipped Tiny Shakespeare corpus (1,115,394 bytes of plain text).

    Returns:
        `Path` to `hf_signopt/data/tinyshakespeare.txt`.

    Raises:
        FileNotFoundError: If the package was installed without its data files.
    """
    path = Path(__file__).with_name("tinyshakespeare.txt")
    if not path.is_file():
        raise FileNotFoundError(
            f"The shipped corpus {path} is missing; reinstall hf-signopt with its package data "
            "(`pip install -e .` from a checkout) or pass --train_file / --dataset_name."
        )
    return path
