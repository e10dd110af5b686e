"""Command-line and config-file parsing shared by the recipes.

Every recipe parses its dataclasses with `HfArgumentParser`, layered so that later layers win:
the recipe's own defaults, then an optional YAML or JSON config file given as the first argument,
then the command-line flags. For example
`python recipes/pretrain_moe.py recipes/configs/pretrain_moe.yaml --max_steps 20`.
"""

import dataclasses
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint


CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")

TRAINING_DEFAULTS = {
    "weight_decay": 0.1,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "eval_strategy": "steps",
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_total_limit": 1,
    "seed": 42,
    "disable_tqdm": False,
}
"""`TrainingArguments` defaults every recipe shares; each recipe adds its own steps, rate and output dir."""


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML or JSON config file holding one mapping of argument names to values.

    Args:
        path: The file, ending in `.yaml`, `.yml` or `.json`.

    Returns:
        The mapping.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
    text = path.read_text(encoding="utf-8")
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"Config file {str(path)!r} must hold a mapping of argument names to values, "
                         f"got {type(values).__name__}.")
    return values


def parse_recipe_arguments(
    dataclass_types: Sequence[type],
    recipe_defaults: Mapping[str, Any],
    argv: Sequence[str],
) -> tuple[Any, ...]:
    """Parses `argv` into `dataclass_types`: recipe defaults < config file < command-line flags.

    Args:
        dataclass_types: The argument dataclasses, e.g. `(ModelArguments, DataArguments,
            TrainingArguments)`.
        recipe_defaults: Defaults this recipe uses instead of the dataclasses' own (for example
            `optim="simba"`).
        argv: The arguments after the script name; if the first one ends in `.yaml`, `.yml` or
            `.json` it is read as a config file.

    Returns:
        One instance per dataclass type, in order.

    Raises:
        FileNotFoundError: If the config file does not exist.
        ValueError: On an unknown key in the config file or defaults, or an unknown flag.
    """
    argv = list(argv)
    file_values: dict[str, Any] = {}
    if argv and argv[0].endswith(CONFIG_FILE_SUFFIXES):
        file_values = load_config_file(argv.pop(0))
    known = {f.name for dtype in dataclass_types for f in dataclasses.fields(dtype) if f.init}
    for source, values in (("recipe defaults", recipe_defaults), ("config file", file_values)):
        unknown = sorted(set(values) - known)
        if unknown:
            hints = {name: difflib.get_close_matches(name, sorted(known), n=1) for name in unknown}
            hint_text = "; ".join(f"{n!r} (did you mean {h[0]!r}?)" if h else repr(n) for n, h in hints.items())
            raise ValueError(f"Unknown argument(s) in the {source}: {hint_text}.")
    parser = HfArgumentParser(dataclass_types)
    parser.set_defaults(**{**recipe_defaults, **file_values})
    return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
    """Turns `--resume_from_checkpoint` into a checkpoint directory.

    Args:
        resume_from_checkpoint: `None` (start fresh), `"last"` (the newest `checkpoint-*` in
            `output_dir`) or a checkpoint directory.
        output_dir: The run's output directory.

    Returns:
        The checkpoint directory to resume from, or `None`.

    Raises:
        FileNotFoundError: If `"last"` finds no checkpoint or the given directory does not exist.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "last":
        last = get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint last: no checkpoint-* directory in {output_dir!r}.")
        return last
    if not Path(resume_from_checkpoint).is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a directory.")
    return resume_from_checkpoint


@dataclasses.dataclass
class RecipeArguments:
    """What a recipe does around training: plots and the generated sample at the end.

    Args:
        make_plots: Write PNG plots (needs matplotlib, `pip install "hf-signopt[plots]"`).
        sample_prompt: Prompt of the sample generated at the end (empty: no sample).
        sample_max_new_tokens: Length of that sample in tokens, in `[1, 1024]`.
    """

    make_plots: bool = dataclasses.field(default=True, metadata={"help": "Write PNG plots (needs matplotlib)."})
    sample_prompt: str = dataclasses.field(
        default="ROMEO:", metadata={"help": "Prompt of the sample generated at the end; empty for none."}
    )
    sample_max_new_tokens: int = dataclasses.field(default=48, metadata={"help": "Sample length, in [1, 1024]."})

    def __post_init__(self) -> None:
        if not 1 <= self.sample_max_new_tokens <= 1024:
            raise ValueError(f"sample_max_new_tokens must be in [1, 1024], got {self.sample_max_new_tokens}.")
