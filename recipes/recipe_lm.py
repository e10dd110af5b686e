"""Causal-LM steps shared by the recipes: datasets to blocks, evaluation with perplexity, a sample."""

import math
from typing import Any

import torch
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments, set_seed
from transformers.utils import logging

from hf_signopt.data import DataArguments, load_text_datasets, tokenize_and_group


logger = logging.get_logger(__name__)

IMPLEMENTATION_SWITCHES = ("foreach", "fused", "capturable", "differentiable")
"""Optimizer `defaults` entries that choose an implementation rather than the math."""


def load_raw_datasets(data_args: DataArguments) -> DatasetDict:
    """Loads the text splits `data_args` names (the shipped corpus by default)."""
    return load_text_datasets(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_file=data_args.train_file,
        validation_file=data_args.validation_file,
        text_column=data_args.text_column,
        validation_split_percentage=data_args.validation_split_percentage,
        cache_dir=data_args.cache_dir,
    )


def prepare_lm_datasets(
    raw: DatasetDict, data_args: DataArguments, tokenizer: PreTrainedTokenizerBase, training_args: TrainingArguments
) -> DatasetDict:
    """Tokenizes and groups `raw` into blocks (main process first, so others reuse its cache).

    Args:
        raw: Text splits `train` and `validation`.
        data_args: Block size, sample limits, workers.
        tokenizer: The tokenizer to apply.
        training_args: For `main_process_first`.

    Returns:
        `train` and `validation` splits of `block_size`-token blocks, truncated to
        `max_train_samples` / `max_eval_samples`.
    """
    with training_args.main_process_first(desc="tokenizing and grouping"):
        blocks = tokenize_and_group(
            raw, tokenizer, data_args.block_size, data_args.text_column, data_args.preprocessing_num_workers
        )
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            blocks[split] = blocks[split].select(range(min(limit, len(blocks[split]))))
    logger.info("Blocks of %d tokens: %d train, %d validation.", data_args.block_size,
                len(blocks["train"]), len(blocks["validation"]))
    return blocks


def perplexity(loss: float) -> float:
    """`exp(loss)`, infinite when it overflows."""
    return math.exp(loss) if loss < 700 else math.inf


def optimizer_name(training_args: TrainingArguments) -> str:
    """The `optim` name as a plain string (`TrainingArguments` may hold an enum member)."""
    return str(getattr(training_args.optim, "value", training_args.optim))


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The hyperparameters an optimizer ran with: its `defaults` (unwrapping accelerate's wrapper).

    torch's implementation switches (`foreach`, `fused`, `capturable`, `differentiable`) and entries that
    are not plain values are left out.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    return {
        name: (list(value) if isinstance(value, tuple) else value)
        for name, value in inner.defaults.items()
        if isinstance(value, (int, float, str, bool, tuple)) and name not in IMPLEMENTATION_SWITCHES
    }


def generate_sample(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int, seed: int
) -> str:
    """Samples a continuation of `prompt` (top-k 50, temperature 0.8) and returns prompt + continuation."""
    set_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    model.eval()
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=True, top_k=50, temperature=0.8,
            pad_token_id=tokenizer.pad_token_id,
        )
    return tokenizer.decode(output[0], skip_special_tokens=True)
