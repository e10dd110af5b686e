"""The recipes' shared helper (recipes/recipe_utils.py): arguments, the output directory, data, tokenizer, reports."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, TrainingArguments

import hf_signopt
import recipe_utils
from recipe_utils import (
    CORPUS,
    DataArguments,
    RunArguments,
    comparison_runs,
    load_text,
    markdown_table,
    parse_arguments,
    perplexity,
    plot_curves,
    plot_expert_load,
    removed_on_failure,
    resolve_output_dir,
    series,
    tokenize_into_blocks,
    train_tokenizer,
    write_model_card,
)


LINES = [f"line {i}: the quick brown fox {i % 7}\n" for i in range(40)]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Each test's `load_dataset` caches under its own tmp dir, not in the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")


def training(output_dir, **kwargs) -> TrainingArguments:
    return TrainingArguments(output_dir=str(output_dir), use_cpu=True, report_to="none", **kwargs)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("".join(LINES), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------------------
# Arguments: recipe defaults < YAML/JSON config file < command-line flags.

TYPES = (DataArguments, TrainingArguments)
DEFAULTS = {"output_dir": "out", "max_steps": 100, "learning_rate": 0.5}


def test_layers_defaults_then_yaml_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 7\nblock_size: 64\nlogging_steps: 3\n", encoding="utf-8")
    data, training_args = parse_arguments(TYPES, DEFAULTS, [str(config), "--logging_steps", "9"])
    assert (data.block_size, training_args.max_steps, training_args.logging_steps) == (64, 7, 9)
    assert (training_args.learning_rate, training_args.output_dir) == (0.5, "out")


def test_json_config_and_no_config(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"max_steps": 3, "save_total_limit": None}), encoding="utf-8")
    _, training_args = parse_arguments(TYPES, DEFAULTS, [str(config)])
    assert (training_args.max_steps, training_args.save_total_limit) == (3, None)
    _, training_args = parse_arguments(TYPES, DEFAULTS, [])
    data, training_args = parse_arguments(TYPES, DEFAULTS, [])
    assert training_args.max_steps == 100 and data == DataArguments()


def test_argv_none_reads_the_command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["recipe.py", "--max_steps", "4"])
    _, training_args = parse_arguments(TYPES, DEFAULTS, None)
    assert training_args.max_steps == 4


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("blok_size: 64\nmax_steps: 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['blok_size'\]"):
        parse_arguments(TYPES, DEFAULTS, [str(config)])
    with pytest.raises(ValueError, match=r"Unknown argument\(s\) \['not_a_default'\]"):
        parse_arguments(TYPES, {"not_a_default": 1}, [])


def test_bad_config_files_and_flags(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_arguments(TYPES, DEFAULTS, [str(tmp_path / "missing.yaml")])
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must hold a mapping"):
        parse_arguments(TYPES, DEFAULTS, [str(listed)])
    with pytest.raises(ValueError, match="not used by the HfArgumentParser.*--not_a_flag"):
        parse_arguments(TYPES, DEFAULTS, ["--not_a_flag", "1"])


def test_unknown_optimizer_name_is_named_with_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_arguments(TYPES, DEFAULTS, ["--optim", "not_an_optimizer"])
    assert "invalid choice: 'not_an_optimizer'" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text("optim: not_an_optimizer\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not_an_optimizer is not a valid OptimizerNames.*'simba'"):
        parse_arguments(TYPES, DEFAULTS, [str(config)])


def test_a_config_file_value_becomes_the_flag_default_and_a_flag_still_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("make_plots: false\nsample_prompt: ''\n", encoding="utf-8")
    (run,) = parse_arguments((RunArguments,), {}, [str(config)])
    assert (run.make_plots, run.sample_prompt) == (False, "")
    (run,) = parse_arguments((RunArguments,), {}, [str(config), "--make_plots", "true", "--sample_prompt", "JULIET:"])
    assert (run.make_plots, run.sample_prompt) == (True, "JULIET:")


def test_run_and_data_arguments_validate(tmp_path):
    assert RunArguments() == RunArguments(overwrite_output_dir=False, make_plots=True, sample_prompt="ROMEO:",
                                          sample_max_new_tokens=48)
    with pytest.raises(ValueError, match=r"sample_max_new_tokens must be in \[1, 1024\], got 0"):
        RunArguments(sample_max_new_tokens=0)
    with pytest.raises(FileNotFoundError, match="'/no/such.txt' does not exist"):
        DataArguments(train_file="/no/such.txt")
    with pytest.raises(ValueError, match=r"Cannot read 'data.parquet2'.*\['.csv', '.json', '.jsonl', '.txt'\]"):
        DataArguments(train_file="data.parquet2")
    with pytest.raises(ValueError, match="not both"):
        DataArguments(dataset_name="x", train_file="y.txt")
    with pytest.raises(ValueError, match="needs --train_file"):
        DataArguments(validation_file="v.txt")
    with pytest.raises(ValueError, match=r"\(0, 100\), got 100"):
        DataArguments(validation_split_percentage=100)
    with pytest.raises(ValueError, match="block_size must be >= 2, got 1"):
        DataArguments(block_size=1)


def test_data_label_names_the_source(text_file):
    assert DataArguments().label == "tinyshakespeare"
    assert DataArguments(train_file=str(text_file)).label == "train.txt"
    assert DataArguments(dataset_name="org/corpus").label == "org/corpus"


# ------------------------------------------------------------------------------------------------------------------
# The output directory: nothing trained before is lost, and a failed run leaves no trace.

def test_a_new_or_empty_output_dir_is_used(tmp_path):
    assert resolve_output_dir(training(tmp_path / "absent"), RunArguments()) is None
    (tmp_path / "empty").mkdir()
    assert resolve_output_dir(training(tmp_path / "empty"), RunArguments()) is None


@pytest.mark.parametrize(("content", "what"), [("config.json", "a trained model"), ("notes.txt", "files")])
def test_an_output_dir_holding_anything_is_refused_unless_overwritten(tmp_path, content, what):
    output = tmp_path / "run"
    output.mkdir()
    (output / content).write_text("{}", encoding="utf-8")
    with pytest.raises(FileExistsError) as error:
        resolve_output_dir(training(output), RunArguments())
    message = str(error.value)
    assert f"{str(output)!r} already holds {what}" in message
    assert "--overwrite_output_dir" in message and "--resume_from_checkpoint last" in message
    assert resolve_output_dir(training(output), RunArguments(overwrite_output_dir=True)) is None
    assert sorted(p.name for p in output.iterdir()) == [content]  # resolving never deletes


def test_resume_from_the_last_checkpoint_by_step_number(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint-\* directory"):
        resolve_output_dir(training(tmp_path / "absent", resume_from_checkpoint="last"), RunArguments())
    with pytest.raises(FileNotFoundError, match=r"no checkpoint-\* directory"):
        resolve_output_dir(training(tmp_path, resume_from_checkpoint="last"), RunArguments())
    for step in (5, 12, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-99").write_text("a file, not a checkpoint", encoding="utf-8")
    # 12 > 9 > 5 by number (a name sort would pick checkpoint-9); the non-empty dir is fine when resuming.
    assert resolve_output_dir(training(tmp_path, resume_from_checkpoint="last"), RunArguments()) == str(
        tmp_path / "checkpoint-12")
    explicit = str(tmp_path / "checkpoint-5")
    assert resolve_output_dir(training(tmp_path, resume_from_checkpoint=explicit), RunArguments()) == explicit
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_output_dir(training(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-99")), RunArguments())


def test_a_failed_run_removes_the_output_dir_it_created(tmp_path):
    output = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with removed_on_failure(str(output)):
            (output / "logs" / "deeper").mkdir(parents=True)  # directories only, no file yet
            raise RuntimeError("boom")
    assert not output.exists()
    with pytest.raises(KeyboardInterrupt):  # an interrupted run too
        with removed_on_failure(str(output)):
            output.mkdir()
            raise KeyboardInterrupt
    assert not output.exists()


def test_a_failed_run_keeps_what_it_did_not_create_or_already_wrote(tmp_path):
    wrote = tmp_path / "wrote"
    with pytest.raises(RuntimeError):
        with removed_on_failure(str(wrote)):
            (wrote / "checkpoint-1").mkdir(parents=True)
            (wrote / "checkpoint-1" / "model.safetensors").write_bytes(b"weights")
            raise RuntimeError
    assert (wrote / "checkpoint-1" / "model.safetensors").read_bytes() == b"weights"
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with removed_on_failure(str(existing)):
            raise RuntimeError
    assert existing.is_dir() and not any(existing.iterdir())
    succeeded = tmp_path / "succeeded"
    with removed_on_failure(str(succeeded)):
        succeeded.mkdir()
    assert succeeded.is_dir()


def test_comparison_runs_are_built_and_validated_before_anything_trains(tmp_path):
    output = tmp_path / "cmp"
    args = training(output, learning_rate=0.1, max_steps=5)
    runs = comparison_runs(args, RunArguments(), {"adamw_torch": {"optim": "adamw_torch"},
                                                  "lion": {"optim": "lion", "learning_rate": 0.01}})
    assert list(runs) == ["adamw_torch", "lion"]
    assert [(str(r.optim.value), r.learning_rate, r.max_steps) for r in runs.values()] == [
        ("adamw_torch", 0.1, 5), ("lion", 0.01, 5)]
    assert [r.output_dir for r in runs.values()] == [str(output / "adamw_torch"), str(output / "lion")]
    assert all(r.resume_from_checkpoint is None for r in runs.values())
    assert args.output_dir == str(output) and str(args.optim.value) != "lion"  # the shared arguments are unchanged
    with pytest.raises(ValueError, match="no_such_optim is not a valid OptimizerNames"):
        comparison_runs(args, RunArguments(), {"x": {"optim": "no_such_optim"}})
    assert not output.exists()


def test_a_comparison_refuses_a_used_dir_and_resumes_run_by_run(tmp_path):
    output = tmp_path / "cmp"
    (output / "lion" / "checkpoint-4").mkdir(parents=True)
    (output / "adamw_torch").mkdir()
    variants = {"adamw_torch": {"optim": "adamw_torch"}, "lion": {"optim": "lion"}}
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        comparison_runs(training(output), RunArguments(), variants)
    overwritten = comparison_runs(training(output), RunArguments(overwrite_output_dir=True), variants)
    assert all(r.resume_from_checkpoint is None for r in overwritten.values())
    resumed = comparison_runs(training(output, resume_from_checkpoint="last"), RunArguments(), variants)
    assert {name: r.resume_from_checkpoint for name, r in resumed.items()} == {"adamw_torch": None, "lion": "last"}
    with pytest.raises(ValueError, match="use --resume_from_checkpoint last"):
        comparison_runs(training(output, resume_from_checkpoint=str(output / "lion" / "checkpoint-4")),
                        RunArguments(), variants)


# ------------------------------------------------------------------------------------------------------------------
# Text data.

def test_default_corpus_is_the_shipped_tiny_shakespeare():
    assert CORPUS == Path(recipe_utils.__file__).resolve().parent / "data" / "tinyshakespeare.txt"
    assert CORPUS.stat().st_size == 1_115_394
    assert CORPUS.read_text(encoding="utf-8").startswith("First Citizen:")


def test_text_file_keeps_line_breaks_and_carves_the_tail_as_validation(text_file):
    splits = load_text(DataArguments(train_file=str(text_file), validation_split_percentage=10))
    assert splits["train"]["text"] == LINES[:36]
    assert splits["validation"]["text"] == LINES[36:]


def test_the_shipped_corpus_is_the_default_source():
    splits = load_text(DataArguments(validation_split_percentage=50))
    lines = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(splits["train"]) + len(splits["validation"]) == len(lines)
    assert splits["train"][0]["text"] == lines[0] and splits["validation"][-1]["text"] == lines[-1]


def write_rows(path: Path, rows: list[str]) -> None:
    """`rows` as a csv (column `body`) or as json lines, by the file's extension."""
    if path.suffix == ".csv":
        path.write_text("body,id\n" + "".join(f"{row},{i}\n" for i, row in enumerate(rows)), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"body": row, "id": i}) + "\n" for i, row in enumerate(rows)),
                        encoding="utf-8")


@pytest.mark.parametrize(("train_name", "valid_name"), [("train.jsonl", "valid.json"), ("train.csv", "valid.csv")])
def test_json_and_csv_files_with_a_validation_file(tmp_path, train_name, valid_name):
    train, valid = tmp_path / train_name, tmp_path / valid_name
    write_rows(train, [f"doc {i}" for i in range(5)])
    write_rows(valid, ["held out one", "held out two"])
    splits = load_text(DataArguments(train_file=str(train), validation_file=str(valid), text_column="body"))
    assert list(splits) == ["train", "validation"]
    assert splits["train"]["body"] == [f"doc {i}" for i in range(5)]
    assert splits["validation"]["body"] == ["held out one", "held out two"]


def test_a_validation_file_of_another_format_than_the_train_file(tmp_path):
    train, valid = tmp_path / "train.jsonl", tmp_path / "valid.csv"
    write_rows(train, [f"doc {i}" for i in range(5)])
    write_rows(valid, ["held out one", "held out two"])
    splits = load_text(DataArguments(train_file=str(train), validation_file=str(valid), text_column="body"))
    assert splits["validation"]["body"] == ["held out one", "held out two"]


def test_dataset_name_resolves_a_local_dataset_directory(tmp_path):
    directory = tmp_path / "my_dataset"
    directory.mkdir()
    (directory / "train.csv").write_text("text\n" + "".join(f"row {i}\n" for i in range(20)), encoding="utf-8")
    splits = load_text(DataArguments(dataset_name=str(directory), validation_split_percentage=25))
    assert splits["train"]["text"] == [f"row {i}" for i in range(15)]
    assert splits["validation"]["text"] == [f"row {i}" for i in range(15, 20)]


def test_missing_text_column_lists_the_columns(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("body\n" + "x\n" * 30, encoding="utf-8")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['body'\].*--text_column"):
        load_text(DataArguments(train_file=str(path)))


def test_validation_carve_that_would_be_empty_is_refused(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("only\nthree\nlines\n", encoding="utf-8")
    with pytest.raises(ValueError, match="leaves 0 validation rows"):
        load_text(DataArguments(train_file=str(path), validation_split_percentage=5))


# ------------------------------------------------------------------------------------------------------------------
# Tokenizer and blocks.

def test_bpe_tokenizer_round_trips_any_text_and_reloads(tmp_path):
    texts = CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)[:2000]
    tokenizer = train_tokenizer(texts, vocab_size=400, model_max_length=64, training_args=training(tmp_path))
    assert len(tokenizer) == 400
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == "<|endoftext|>"
    unseen = "Zebra quux ☃ 12345\n\tend"
    assert tokenizer.decode(tokenizer(unseen)["input_ids"]) == unseen
    # Merges make common text shorter than its bytes.
    sample = "".join(texts[:50])
    assert len(tokenizer(sample)["input_ids"]) < 0.8 * len(sample.encode())
    assert not any(tmp_path.iterdir())  # nothing is written until the model is saved
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
    assert reloaded.model_max_length == 64


def test_bpe_vocabulary_must_hold_the_bytes_and_the_end_of_text(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer_vocab_size must be >= 257.*got 100"):
        train_tokenizer(["abc"], vocab_size=100, model_max_length=8, training_args=training(tmp_path))


def test_blocks_pack_the_token_stream_and_drop_the_tail(text_file, tmp_path):
    data_args = DataArguments(train_file=str(text_file), validation_split_percentage=10, block_size=8)
    splits = load_text(data_args)
    args = training(tmp_path / "out")
    tokenizer = train_tokenizer(splits["train"]["text"], vocab_size=300, model_max_length=16, training_args=args)
    blocks = tokenize_into_blocks(splits, tokenizer, data_args, args)
    for split, lines in (("train", LINES[:36]), ("validation", LINES[36:])):
        # Per-line tokenization equals whole-text tokenization here: every line ends in a newline.
        stream = tokenizer("".join(lines))["input_ids"]
        expected = [stream[i:i + 8] for i in range(0, len(stream) // 8 * 8, 8)]
        assert blocks[split]["input_ids"] == expected
        assert blocks[split]["labels"] == expected
        assert blocks[split]["attention_mask"] == [[1] * 8] * len(expected)
        assert blocks[split].column_names == ["input_ids", "attention_mask", "labels"]


def test_blocks_longer_than_the_tokenizer_or_the_data_are_refused(text_file, tmp_path):
    splits = load_text(DataArguments(train_file=str(text_file), validation_split_percentage=3))
    args = training(tmp_path / "out")
    tokenizer = train_tokenizer(splits["train"]["text"], vocab_size=300, model_max_length=16, training_args=args)
    with pytest.raises(ValueError, match=r"block_size=32 exceeds.*model_max_length 16.*\[2, 16\]"):
        tokenize_into_blocks(splits, tokenizer, DataArguments(block_size=32), args)
    # 3% of 40 lines leaves one validation line, shorter than 16 tokens.
    assert len(tokenizer(splits["validation"]["text"][0])["input_ids"]) < 16
    with pytest.raises(ValueError, match="validation split has fewer than block_size=16"):
        tokenize_into_blocks(splits, tokenizer, DataArguments(block_size=16), args)


# ------------------------------------------------------------------------------------------------------------------
# Metrics, plots, tables.

LOG_HISTORY = [
    {"loss": 5.0, "step": 10, "moe/maxvio": 1.5},
    {"eval_loss": 4.8, "step": 10},
    {"loss": 4.0, "step": 20, "moe/maxvio": 0.5},
    {"eval_loss": 4.1, "step": 20},
]


def test_series_picks_one_key_in_order():
    assert series(LOG_HISTORY, "loss") == ([10, 20], [5.0, 4.0])
    assert series(LOG_HISTORY, "eval_loss") == ([10, 20], [4.8, 4.1])
    assert series(LOG_HISTORY, "absent") == ([], [])


def test_perplexity_is_exp_of_the_loss_and_infinite_past_overflow():
    assert perplexity(0.0) == 1.0
    assert perplexity(2.5) == pytest.approx(12.182493960703473)
    assert perplexity(800.0) == math.inf  # math.exp(800) overflows


def test_markdown_table():
    rows = [{"name": "simba", "loss": 2.0, "steps": 10, "per_layer": [0.125, 1.0]},
            {"name": "lion", "loss": 1.23456, "steps": 20, "per_layer": (0.5,)}]
    table = markdown_table(rows, {"name": "optimizer", "loss": "eval loss", "per_layer": "per layer"})
    assert table.splitlines() == [
        "| optimizer | eval loss | per layer |",
        "|---|---|---|",
        "| simba | 2.0000 | 0.12 1.00 |",
        "| lion | 1.2346 | 0.50 |",
    ]


def png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_write_pngs(tmp_path):
    plot_curves({"train": series(LOG_HISTORY, "loss"), "empty": ([], [])}, tmp_path / "loss.png",
                title="Loss", ylabel="loss")
    assert png_size(tmp_path / "loss.png") == (640, 400)
    # Two runs side by side: the figure is wider than one.
    plot_expert_load({"a": [[1, 3], [2, 2]]}, tmp_path / "one.png", title="load")
    plot_expert_load({"a": [[1, 3], [2, 2]], "b": [[5, 5], [9, 1]]}, tmp_path / "two.png", title="load")
    assert png_size(tmp_path / "two.png")[0] > png_size(tmp_path / "one.png")[0]
    # A layer that routed no token is drawn, not a division by zero.
    plot_expert_load({"a": [[0, 0], [2, 2]]}, tmp_path / "idle.png", title="load")
    assert png_size(tmp_path / "idle.png")


# ------------------------------------------------------------------------------------------------------------------
# The model card.

ROUTING = dict(balancing="loss-free", score_func="sigmoid", update_rule="rms", update_rate=0.001,
               aux_loss_coef=0.0, num_experts=8, top_k=2)


def stub_trainer(output_dir: Path, optim: str = "simba", model_type: str = "lossfree_moe"):
    """What `write_model_card` reads of a Trainer: its model, arguments, optimizer and state."""
    model = torch.nn.Linear(10, 3)  # 33 parameters
    model.config = SimpleNamespace(model_type=model_type)
    optimizers = {"simba": lambda p: hf_signopt.Simba(p, lr=0.002, window_size=128, threshold=0.1),
                  "lion": lambda p: hf_signopt.Lion(p, lr=0.001)}
    args = training(output_dir, optim=optim, learning_rate=0.002, per_device_train_batch_size=4, seed=7,
                    lr_scheduler_type="cosine", weight_decay=0.1)
    output_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(model=model, args=args, optimizer=optimizers[optim](model.parameters()),
                           state=SimpleNamespace(max_steps=500))


CARD = dict(recipe="pretrain_moe", dataset="tinyshakespeare", plots=[("Per-expert load", "expert_load.png")],
            prompt="ROMEO:", metrics={"eval_loss": 3.5, "perplexity": math.exp(3.5), "maxvio_global": 0.05,
                                      "maxvio_global_max": 0.125})


def test_model_card_of_the_main_job(tmp_path):
    write_model_card(stub_trainer(tmp_path / "my_moe"), routing=ROUTING, **CARD)
    card = ModelCard.load(tmp_path / "my_moe" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["moe", "loss-free-balancing", "simba"]
    assert card.data.datasets == ["tinyshakespeare"]
    assert card.data.base_model is None and card.data.model_name == "my_moe"
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"eval_loss": 3.5, "perplexity": pytest.approx(math.exp(3.5)), "maxvio_global": 0.05}
    text = card.text
    assert text.lstrip().startswith("# my_moe")
    assert "Pre-trained from scratch on **tinyshakespeare** with the `simba` optimizer" in text
    assert "8 experts per layer,\n2 chosen per token, 33 parameters" in text
    assert "**sigmoid**" in text and "**rms** rule at rate `u = 0.001`" in text
    assert "(Q - F) / RMS(F - Q)" in text
    assert "| window_size | 128 |" in text and "| threshold | 0.1 |" in text and "| lr | 0.002 |" in text
    assert "foreach" not in text
    assert "| max_steps | 500 |" in text and "| processes | 1 |" in text and "| seed | 7 |" in text
    assert "| lr_scheduler_type | cosine |" in text
    assert "| maxvio_global_max | 0.125 |" in text
    assert "![Per-expert load](expert_load.png)" in text
    assert 'tokenizer("ROMEO:", return_tensors="pt")' in text
    assert "`all_results.json`" in text and "metrics.json" not in text


def test_model_card_of_a_dense_model_fine_tuned_from_the_hub_or_a_local_dir(tmp_path):
    card_args = CARD | {"recipe": "finetune", "metrics": {"eval_loss": 2.0}, "plots": []}
    write_model_card(stub_trainer(tmp_path / "hub", optim="lion", model_type="llama"), routing=None,
                     base_model="org/base", base_model_on_hub=True, **card_args)
    card = ModelCard.load(tmp_path / "hub" / "README.md")
    assert card.data.base_model == "org/base"
    assert card.data.tags == ["lion"]
    assert "Fine-tuned from `org/base` on **tinyshakespeare** with the `lion` optimizer" in card.text
    assert "It has 33 parameters (`llama`)" in card.text
    assert "e_score_correction_bias" not in card.text
    # A local base model: named in the text only, since its path means nothing on the hub.
    write_model_card(stub_trainer(tmp_path / "local", optim="lion", model_type="llama"), routing=None,
                     base_model="my_base", base_model_on_hub=False, **card_args)
    card = ModelCard.load(tmp_path / "local" / "README.md")
    assert card.data.base_model is None
    assert "base_model" not in (tmp_path / "local" / "README.md").read_text().split("---")[1]
    assert "Fine-tuned from `my_base`" in card.text


@pytest.mark.parametrize(("balancing", "prose"), [
    ("aux-loss", "auxiliary load-balancing loss** with coefficient 0.001"),
    ("none", "**No load balancing** was applied"),
])
def test_model_card_of_the_baselines(tmp_path, balancing, prose):
    routing = ROUTING | {"balancing": balancing, "aux_loss_coef": 0.001 if balancing == "aux-loss" else 0.0}
    write_model_card(stub_trainer(tmp_path / "run"), routing=routing, **CARD)
    card = ModelCard.load(tmp_path / "run" / "README.md")
    assert card.data.tags == ["moe", "simba"]
    assert prose in card.text
    assert not re.search(r"rule at rate", card.text)
