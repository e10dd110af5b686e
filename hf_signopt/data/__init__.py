"""Text data for the recipes: the shipped corpus, dataset loading, tokenizer training, blocks.

The project ships Tiny Shakespeare (`tinyshakespeare.txt`, public domain, see `README.md` here) so
that every recipe, test and benchmark runs offline.
"""

from .arguments import DataArguments
from .blocks import group_into_blocks, tokenize_and_group
from .corpus import DEFAULT_CORPUS_NAME, default_corpus_path
from .loading import load_text_datasets
from .tokenizer import train_bpe_tokenizer


__all__ = [
    "DEFAULT_CORPUS_NAME",
    "DataArguments",
    "default_corpus_path",
    "group_into_blocks",
    "load_text_datasets",
    "tokenize_and_group",
    "train_bpe_tokenizer",
]
