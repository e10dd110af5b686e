"""Tokenize a text dataset and cut the token stream into fixed-length blocks for causal LM training."""

from typing import Any

from datasets import DatasetDict
from transformers import PreTrainedTokenizerBase


def group_into_blocks(examples: dict[str, list[list[Any]]], block_size: int) -> dict[str, list[list[Any]]]:
    """Concatenates every column of a tokenized batch and cuts it into `block_size` pieces.

    The tail that does not fill a whole block is dropped. `labels` is a copy of `input_ids`
    (the model shifts them).

    Args:
        examples: A batch as `datasets.map(batched=True)` passes it: column -> list of token lists.
        block_size: Tokens per block, at least 2.

    Returns:
        The batch of blocks, with a `labels` column.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}.")
    concatenated = {name: [token for row in rows for token in row] for name, rows in examples.items()}
    total = (len(concatenated["input_ids"]) // block_size) * block_size
    blocks = {
        name: [tokens[start : start + block_size] for start in range(0, total, block_size)]
        for name, tokens in concatenated.items()
    }
    blocks["labels"] = [list(block) for block in blocks["input_ids"]]
    return blocks


def tokenize_and_group(
    datasets: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    block_size: int,
    text_column: str = "text",
    num_proc: int | None = None,
) -> DatasetDict:
    """Tokenizes every split and groups it into blocks of `block_size` tokens.

    Each split is concatenated as one stream (in `datasets.map` batches of 1000 rows) and cut into
    blocks, so short rows such as the lines of a text file are packed without padding.

    Args:
        datasets: Splits with a `text_column`.
        tokenizer: The tokenizer to apply.
        block_size: Tokens per block, in `[2, tokenizer.model_max_length]`.
        text_column: Column holding the text.
        num_proc: Processes for `datasets.map` (in-process when `None`).

    Returns:
        Splits with `input_ids`, `attention_mask` and `labels` columns, one block per row.

    Raises:
        ValueError: On a bad `block_size`, or when a split is too short for one block.
    """
    if not 2 <= block_size <= tokenizer.model_max_length:
        raise ValueError(
            f"block_size must be in [2, {tokenizer.model_max_length}] (the tokenizer's model_max_length), "
            f"got {block_size}."
        )

    def tokenize(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return tokenizer(batch[text_column], return_attention_mask=True)

    grouped = DatasetDict()
    for split, dataset in datasets.items():
        tokenized = dataset.map(
            tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
            desc=f"Tokenizing {split}",
        )
        grouped[split] = tokenized.map(
            group_into_blocks, batched=True, num_proc=num_proc, fn_kwargs={"block_size": block_size},
            desc=f"Grouping {split} into blocks of {block_size}",
        )
        if len(grouped[split]) == 0:
            raise ValueError(
                f"The {split} split has fewer than block_size={block_size} tokens, so it yields no block; "
                "give more text or a smaller block_size."
            )
    return grouped
