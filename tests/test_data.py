"""Data loading, BPE tokenizer training and block grouping (hf_signopt.data)."""

import json

import pytest
from transformers import AutoTokenizer

from hf_signopt.data import (
    DataArguments,
    default_corpus_path,
    group_into_blocks,
    load_text_datasets,
    tokenize_and_group,
    train_bpe_tokenizer,
)


LINES = [f"line {i}: the quick brown fox {i % 7}\n" for i in range(40)]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("".join(LINES), encoding="utf-8")
    return path


def test_default_corpus_is_the_shipped_tiny_shakespeare():
    path = default_corpus_path()
    assert path.stat().st_size == 1_115_394
    assert path.read_text(encoding="utf-8").startswith("First Citizen:")


def test_text_file_keeps_line_breaks_and_carves_the_tail_as_validation(text_file, tmp_path):
    splits = load_text_datasets(
        train_file=str(text_file), validation_split_percentage=10, cache_dir=str(tmp_path / "c")
    )
    assert splits["train"]["text"] == LINES[:36]
    assert splits["validation"]["text"] == LINES[36:]


def test_json_and_csv_files_with_a_validation_file(tmp_path):
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.csv"
    train.write_text("".join(json.dumps({"body": f"doc {i}", "id": i}) + "\n" for i in range(5)), encoding="utf-8")
    valid.write_text("body,id\nheld out one,1\nheld out two,2\n", encoding="utf-8")
    splits = load_text_datasets(
        train_file=str(train), validation_file=str(valid), text_column="body", cache_dir=str(tmp_path / "c")
    )
    assert splits["train"]["body"] == [f"doc {i}" for i in range(5)]
    assert splits["validation"]["body"] == ["held out one", "held out two"]


def test_dataset_name_resolves_a_local_dataset_directory(tmp_path):
    directory = tmp_path / "my_dataset"
    directory.mkdir()
    (directory / "train.csv").write_text("text\n" + "".join(f"row {i}\n" for i in range(20)), encoding="utf-8")
    splits = load_text_datasets(
        dataset_name=str(directory), validation_split_percentage=25, cache_dir=str(tmp_path / "c")
    )
    assert splits["train"]["text"] == [f"row {i}" for i in range(15)]
    assert splits["validation"]["text"] == [f"row {i}" for i in range(15, 20)]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"train_file": "/nonexistent/train.txt"}, FileNotFoundError, "/nonexistent/train.txt"),
        ({"train_file": "data.parquet2"}, ValueError, "unsupported extension '.parquet2'"),
        ({"dataset_name": "x", "train_file": "y.txt"}, ValueError, "not both"),
        ({"validation_file": "v.txt"}, ValueError, "needs a train_file"),
        ({"validation_split_percentage": 100}, ValueError, r"\(0, 100\), got 100"),
    ],
)
def test_bad_sources_fail_clearly(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_text_datasets(**kwargs)


def test_missing_text_column_lists_the_columns(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("body\n" + "x\n" * 30, encoding="utf-8")
    with pytest.raises(ValueError, match=r"no text column 'text'.*\['body'\]"):
        load_text_datasets(train_file=str(path), cache_dir=str(tmp_path / "c"))


def test_validation_carve_that_would_be_empty_is_refused(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("only\nthree\nlines\n", encoding="utf-8")
    with pytest.raises(ValueError, match="leaves 0 validation rows"):
        load_text_datasets(train_file=str(path), validation_split_percentage=5, cache_dir=str(tmp_path / "c"))


def test_bpe_tokenizer_round_trips_any_text_and_reloads(tmp_path):
    texts = [line for line in default_corpus_path().read_text(encoding="utf-8").splitlines(keepends=True)[:2000]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400, model_max_length=64)
    assert len(tokenizer) == 400
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    unseen = "Zebra quux ☃ 12345\n\tend"
    assert tokenizer.decode(tokenizer(unseen)["input_ids"]) == unseen
    # Merges make common text shorter than its bytes.
    sample = "".join(texts[:50])
    assert len(tokenizer(sample)["input_ids"]) < 0.8 * len(sample.encode())
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert reloaded.model_max_length == 64


def test_bpe_tokenizer_arguments_are_validated():
    with pytest.raises(ValueError, match="vocab_size must be >= 257.*got 100"):
        train_bpe_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency must be >= 1, got 0"):
        train_bpe_tokenizer(["abc"], min_frequency=0)
    with pytest.raises(ValueError, match="empty"):
        train_bpe_tokenizer([], vocab_size=300)


def test_group_into_blocks_concatenates_and_drops_the_tail():
    batch = {"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "attention_mask": [[1] * 3, [1] * 2, [1] * 4]}
    blocks = group_into_blocks(batch, block_size=4)
    assert blocks["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert blocks["labels"] == blocks["input_ids"]
    assert blocks["attention_mask"] == [[1] * 4, [1] * 4]
    with pytest.raises(ValueError, match="block_size must be >= 2, got 1"):
        group_into_blocks(batch, block_size=1)


def test_tokenize_and_group_packs_the_token_stream(text_file, tmp_path):
    splits = load_text_datasets(
        train_file=str(text_file), validation_split_percentage=10, cache_dir=str(tmp_path / "c")
    )
    tokenizer = train_bpe_tokenizer(splits["train"]["text"], vocab_size=300, model_max_length=16)
    blocks = tokenize_and_group(splits, tokenizer, block_size=8)
    stream = tokenizer("".join(LINES[:36]))["input_ids"]
    expected = [stream[i : i + 8] for i in range(0, len(stream) // 8 * 8, 8)]
    # Per-line tokenization equals whole-text tokenization here: every line ends in a newline.
    assert blocks["train"]["input_ids"] == expected
    with pytest.raises(ValueError, match=r"block_size must be in \[2, 16\]"):
        tokenize_and_group(splits, tokenizer, block_size=32)
    short = load_text_datasets(train_file=str(text_file), validation_split_percentage=3, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="validation split has fewer than block_size=16"):
        tokenize_and_group(short, tokenizer, block_size=16)


def test_data_arguments_validate(tmp_path):
    with pytest.raises(FileNotFoundError, match="--train_file '/no/such.txt' does not exist"):
        DataArguments(train_file="/no/such.txt")
    with pytest.raises(ValueError, match="block_size must be >= 2, got 1"):
        DataArguments(block_size=1)
    with pytest.raises(ValueError, match="max_eval_samples must be >= 1"):
        DataArguments(max_eval_samples=0)
    assert DataArguments().dataset_label == "tinyshakespeare"
