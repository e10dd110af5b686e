"""`HfArgumentParser` dataclass for the data options every recipe shares."""

from dataclasses import dataclass, field
from pathlib import Path

from .corpus import DEFAULT_CORPUS_NAME


@dataclass
class DataArguments:
    """Which text to train and evaluate on, and how to cut it into blocks.

    With neither `dataset_name` nor `train_file`, the recipes use the shipped Tiny Shakespeare corpus.

    Args:
        dataset_name: A `datasets` hub name or local dataset directory.
        dataset_config_name: Configuration of `dataset_name`.
        train_file: Local training file: `.txt` (one row per line), `.json`/`.jsonl` or `.csv`.
        validation_file: Local validation file in the same formats.
        text_column: Column holding the text (`text` for text files).
        validation_split_percentage: Percent of training rows held out when there is no
            validation split, in `(0, 100)`.
        block_size: Tokens per training block, at least 2.
        max_train_samples: Keep only the first N training blocks (all when `None`).
        max_eval_samples: Keep only the first N validation blocks (all when `None`).
        preprocessing_num_workers: Processes for tokenization (in-process when `None`).
        cache_dir: Where `datasets` caches what it reads.
    """

    dataset_name: str | None = field(default=None, metadata={"help": "A datasets hub name or local dataset dir."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (.txt, .json, .jsonl, .csv)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file (same formats)."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text."})
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of train rows held out when no validation split exists, in (0, 100)."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training block (>= 2)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N validation blocks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    cache_dir: str | None = field(default=None, metadata={"help": "Cache directory for datasets."})

    def __post_init__(self) -> None:
        if self.dataset_name is not None and (self.train_file is not None or self.validation_file is not None):
            raise ValueError("Give either --dataset_name or --train_file/--validation_file, not both.")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError(f"--validation_file {self.validation_file!r} needs --train_file too.")
        if not 0 < self.validation_split_percentage < 100:
            raise ValueError(
                f"validation_split_percentage must be in (0, 100), got {self.validation_split_percentage}."
            )
        if self.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {self.block_size}.")
        for name in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {value}.")
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"--{name} {path!r} does not exist.")

    @property
    def dataset_label(self) -> str:
        """A short name of the data for model cards and logs: hub name, file name or the shipped corpus."""
        if self.dataset_name is not None:
            return self.dataset_name
        if self.train_file is not None:
            return Path(self.train_file).name
        return DEFAULT_CORPUS_NAME
