"""Train a byte-level BPE tokenizer with `tokenizers` and wrap it as a `PreTrainedTokenizerFast`."""

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


END_OF_TEXT = "<|endoftext|>"
"""The one special token: beginning, end, padding and unknown, as in GPT-2."""

BYTE_ALPHABET_SIZE = 256


def train_bpe_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 2048,
    min_frequency: int = 2,
    model_max_length: int = 1024,
) -> PreTrainedTokenizerFast:
    """Trains a byte-level BPE tokenizer (GPT-2 style) on `texts`.

    Every byte is in the vocabulary, so any text round-trips through `encode`/`decode` exactly.

    Args:
        texts: Training texts, e.g. the `text` column of the training split.
        vocab_size: Final vocabulary size including the 256 byte tokens and `<|endoftext|>`; at
            least 257.
        min_frequency: Minimum count of a pair to be merged, at least 1.
        model_max_length: Longest sequence the model accepts, recorded in the tokenizer, at least 1.

    Returns:
        A `PreTrainedTokenizerFast` whose bos/eos/unk/pad token is `<|endoftext|>`; save it with
        `save_pretrained` and load it back with `AutoTokenizer.from_pretrained`.

    Raises:
        ValueError: On an out-of-range argument or when `texts` is empty.
    """
    if vocab_size < BYTE_ALPHABET_SIZE + 1:
        raise ValueError(f"vocab_size must be >= {BYTE_ALPHABET_SIZE + 1} (bytes + {END_OF_TEXT}), got {vocab_size}.")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}.")
    if model_max_length < 1:
        raise ValueError(f"model_max_length must be >= 1, got {model_max_length}.")

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted(items: Iterable[str]) -> Iterable[str]:
        nonlocal seen
        for item in items:
            seen += 1
            yield item

    bpe.train_from_iterator(counted(texts), trainer=trainer)
    if seen == 0:
        raise ValueError("Cannot train a tokenizer on no text: `texts` is empty.")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=model_max_length,
    )
