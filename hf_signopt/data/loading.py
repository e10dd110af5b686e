"""Load a text dataset (hub name, local text/json/csv files, or the shipped corpus) as train/validation."""

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from transformers.utils import logging

from .corpus import default_corpus_path


logger = logging.get_logger(__name__)

LOCAL_FILE_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".csv": "csv"}
"""File extension -> `datasets` builder used to read a local file."""


def _builder_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in LOCAL_FILE_BUILDERS:
        raise ValueError(
            f"Cannot read {path!r}: unsupported extension {suffix!r}; "
            f"expected one of {sorted(LOCAL_FILE_BUILDERS)}."
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    return LOCAL_FILE_BUILDERS[suffix]


def _load_local_file(path: str, cache_dir: str | None) -> Dataset:
    builder = _builder_for(path)
    # Text files keep their line breaks: concatenated lines then reproduce the original text.
    extra = {"keep_linebreaks": True} if builder == "text" else {}
    return load_dataset(builder, data_files={"train": path}, split="train", cache_dir=cache_dir, **extra)


def _carve_validation(train: Dataset, validation_split_percentage: float) -> DatasetDict:
    n_valid = int(len(train) * validation_split_percentage / 100)
    if n_valid < 1 or n_valid >= len(train):
        raise ValueError(
            f"validation_split_percentage={validation_split_percentage} of {len(train)} training rows leaves "
            f"{n_valid} validation rows; need at least 1 and fewer than {len(train)}: give more data, "
            "a larger percentage, or a validation file."
        )
    # The held-out rows are the contiguous tail, so no neighbouring line of a document leaks across.
    n_train = len(train) - n_valid
    return DatasetDict(train=train.select(range(n_train)), validation=train.select(range(n_train, len(train))))


def load_text_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    validation_file: str | None = None,
    text_column: str = "text",
    validation_split_percentage: float = 5.0,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Loads a text dataset with a `train` and a `validation` split.

    Exactly one source is used: a `datasets` hub name (or local dataset directory), local files, or,
    when neither is given, the shipped Tiny Shakespeare corpus. When the source has no validation
    split, the last `validation_split_percentage` percent of the training rows become one.

    Args:
        dataset_name: Name of a dataset on the Hugging Face hub, or a local dataset directory.
        dataset_config_name: Configuration of `dataset_name`, if it has several.
        train_file: Local training file (`.txt`/`.text`: one row per line; `.json`/`.jsonl`; `.csv`).
        validation_file: Local validation file, same formats; needs `train_file`.
        text_column: Column holding the text. Text files always use `"text"`.
        validation_split_percentage: Percentage of training rows carved off when no validation
            split exists, in `(0, 100)`.
        cache_dir: Where `datasets` keeps its cache (its default when `None`).

    Returns:
        A `DatasetDict` with `train` and `validation` splits that both have `text_column`.

    Raises:
        ValueError: On conflicting sources, an unsupported file extension, a missing text column or
            a split that would be empty.
        FileNotFoundError: If a given file does not exist.
    """
    if dataset_name is not None and (train_file is not None or validation_file is not None):
        raise ValueError("Give either dataset_name or train_file/validation_file, not both.")
    if validation_file is not None and train_file is None:
        raise ValueError(f"validation_file={validation_file!r} needs a train_file too.")
    if not 0 < validation_split_percentage < 100:
        raise ValueError(
            f"validation_split_percentage must be in (0, 100), got {validation_split_percentage}."
        )

    if dataset_name is not None:
        raw = load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        if "train" not in raw:
            raise ValueError(f"Dataset {dataset_name!r} has no 'train' split; it has {sorted(raw)}.")
        if "validation" in raw:
            splits = DatasetDict(train=raw["train"], validation=raw["validation"])
        else:
            logger.info("Dataset %s has no validation split; carving %s%% off train.", dataset_name,
                        validation_split_percentage)
            splits = _carve_validation(raw["train"], validation_split_percentage)
    else:
        path = train_file if train_file is not None else str(default_corpus_path())
        train = _load_local_file(path, cache_dir)
        if validation_file is not None:
            splits = DatasetDict(train=train, validation=_load_local_file(validation_file, cache_dir))
        else:
            splits = _carve_validation(train, validation_split_percentage)

    for split, dataset in splits.items():
        if text_column not in dataset.column_names:
            raise ValueError(
                f"The {split} split has no text column {text_column!r}; its columns are {dataset.column_names}. "
                "Set text_column to one of them."
            )
        if len(dataset) == 0:
            raise ValueError(f"The {split} split is empty.")
    return splits
