"""Recipe argument parsing: recipe defaults < YAML/JSON config file < command-line flags."""

import json
import sys
from pathlib import Path

import pytest
from transformers import TrainingArguments

from hf_signopt.data import DataArguments


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from recipe_arguments import RecipeArguments, parse_recipe_arguments, resolve_resume_checkpoint  # noqa: E402
from recipe_moe import MoeModelArguments  # noqa: E402


TYPES = (DataArguments, TrainingArguments)
DEFAULTS = {"output_dir": "out", "max_steps": 100, "learning_rate": 0.5}


def test_layers_defaults_then_yaml_then_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 7\nblock_size: 64\nlogging_steps: 3\n", encoding="utf-8")
    data, training = parse_recipe_arguments(TYPES, DEFAULTS, [str(config), "--logging_steps", "9"])
    assert (data.block_size, training.max_steps, training.logging_steps) == (64, 7, 9)
    assert (training.learning_rate, training.output_dir) == (0.5, "out")


def test_json_config_and_no_config(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"max_steps": 3, "save_total_limit": None}), encoding="utf-8")
    _, training = parse_recipe_arguments(TYPES, DEFAULTS, [str(config)])
    assert (training.max_steps, training.save_total_limit) == (3, None)
    _, training = parse_recipe_arguments(TYPES, DEFAULTS, [])
    assert training.max_steps == 100


def test_unknown_config_key_suggests_the_closest_name(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("blok_size: 64\n", encoding="utf-8")
    with pytest.raises(ValueError, match="'blok_size' \\(did you mean 'block_size'\\?\\)"):
        parse_recipe_arguments(TYPES, DEFAULTS, [str(config)])


def test_bad_config_files_and_flags(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        parse_recipe_arguments(TYPES, DEFAULTS, [str(tmp_path / "missing.yaml")])
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must hold a mapping"):
        parse_recipe_arguments(TYPES, DEFAULTS, [str(listed)])
    with pytest.raises(ValueError, match="not used by the HfArgumentParser.*--not_a_flag"):
        parse_recipe_arguments(TYPES, DEFAULTS, ["--not_a_flag", "1"])


def test_unknown_optimizer_name_is_named_with_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_recipe_arguments(TYPES, DEFAULTS, ["--optim", "not_an_optimizer"])
    assert "invalid choice: 'not_an_optimizer'" in capsys.readouterr().err
    config = tmp_path / "run.yaml"
    config.write_text("optim: not_an_optimizer\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not_an_optimizer is not a valid OptimizerNames.*'simba'"):
        parse_recipe_arguments(TYPES, DEFAULTS, [str(config)])


def test_model_and_recipe_arguments_validate():
    with pytest.raises(ValueError, match="balancing must be one of .*got 'auxloss'"):
        MoeModelArguments(balancing="auxloss")
    with pytest.raises(ValueError, match="balancing='none' trains without balancing"):
        MoeModelArguments(balancing="none", router_aux_loss_coef=0.01)
    with pytest.raises(ValueError, match="needs router_aux_loss_coef > 0, got 0.0"):
        MoeModelArguments(balancing="aux-loss", router_aux_loss_coef=0.0)
    with pytest.raises(ValueError, match="tokenizer_vocab_size must be >= 257"):
        MoeModelArguments(tokenizer_vocab_size=10)
    with pytest.raises(ValueError, match=r"sample_max_new_tokens must be in \[1, 1024\], got 0"):
        RecipeArguments(sample_max_new_tokens=0)


def test_resume_resolution(tmp_path):
    assert resolve_resume_checkpoint(None, str(tmp_path)) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint-\\* directory"):
        resolve_resume_checkpoint("last", str(tmp_path))
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-12").mkdir()
    assert resolve_resume_checkpoint("last", str(tmp_path)) == str(tmp_path / "checkpoint-12")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-99"), str(tmp_path))
