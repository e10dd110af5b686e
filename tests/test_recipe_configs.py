"""The config files shipped in recipes/configs/ and the recipes' built-in defaults."""

import inspect
import json
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

import compare_balancing
import compare_optimizers
import finetune
import hf_signopt
import pretrain_moe
from recipe_utils import DataArguments, RunArguments, parse_arguments


CONFIGS = Path(__file__).resolve().parent.parent / "recipes" / "configs"
FINETUNE_ARGUMENTS = (finetune.ModelArguments, DataArguments, TrainingArguments, RunArguments)
RECIPES = {
    "pretrain_moe.yaml": (pretrain_moe.ARGUMENTS, pretrain_moe.DEFAULTS),
    "finetune.json": (FINETUNE_ARGUMENTS, finetune.DEFAULTS),
    "compare_optimizers.yaml": ((compare_optimizers.ComparisonArguments, *pretrain_moe.ARGUMENTS),
                                compare_optimizers.DEFAULTS),
    "compare_balancing.yaml": ((compare_balancing.ComparisonArguments, *pretrain_moe.ARGUMENTS),
                               compare_balancing.DEFAULTS),
}


def read_config(name: str) -> dict:
    text = (CONFIGS / name).read_text(encoding="utf-8")
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


def plain(value):
    return getattr(value, "value", value)  # TrainingArguments holds some settings as enum members


def test_every_shipped_config_is_tested():
    assert sorted(path.name for path in CONFIGS.iterdir()) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_config_sets_every_value_it_names(name):
    types, defaults = RECIPES[name]
    parsed = parse_arguments(types, defaults, [str(CONFIGS / name)])
    config = read_config(name)
    assert config
    for key, value in config.items():
        holders = [args for args in parsed if hasattr(args, key)]
        assert len(holders) == 1, key
        assert plain(getattr(holders[0], key)) == value, key


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_flags_after_a_config_file_override_it(name):
    types, defaults = RECIPES[name]
    parsed = parse_arguments(types, defaults, [str(CONFIGS / name), "--max_steps", "3", "--output_dir", "elsewhere"])
    training = next(args for args in parsed if isinstance(args, TrainingArguments))
    assert (training.max_steps, training.output_dir) == (3, "elsewhere")


def test_main_job_config_writes_out_the_built_in_defaults():
    from_file = parse_arguments(pretrain_moe.ARGUMENTS, pretrain_moe.DEFAULTS, [str(CONFIGS / "pretrain_moe.yaml")])
    built_in = parse_arguments(pretrain_moe.ARGUMENTS, pretrain_moe.DEFAULTS, [])
    (model_file, data_file, training_file, run_file), (model, data, training, run) = from_file, built_in
    assert (model_file, data_file, run_file) == (model, data, run)
    assert model == pretrain_moe.ModelArguments() and data == DataArguments() and run == RunArguments()
    file_settings, built_in_settings = training_file.to_dict(), training.to_dict()
    # The file also spells out Simba's own defaults as optim_args.
    simba = inspect.signature(hf_signopt.Simba).parameters
    assert file_settings.pop("optim_args") == (f"window_size={simba['window_size'].default},"
                                               f"threshold={simba['threshold'].default}")
    assert built_in_settings.pop("optim_args") is None
    assert file_settings == built_in_settings


def test_the_main_job_defaults():
    """What the README and the recipe's docstring promise: 4 layers x 8 experts, top-2, Simba, 500 steps."""
    model, data, training, run = parse_arguments(pretrain_moe.ARGUMENTS, pretrain_moe.DEFAULTS, [])
    assert (model.num_hidden_layers, model.num_local_experts, model.num_experts_per_tok) == (4, 8, 2)
    assert (model.balancing, model.router_bias_update_rule, model.router_bias_update_rate) == ("loss-free", "sign",
                                                                                               0.001)
    assert (plain(training.optim), training.learning_rate, training.max_steps) == ("simba", 2e-3, 500)
    assert (training.output_dir, training.save_total_limit, training.report_to) == ("outputs/pretrain_moe", 1, [])
    assert (data.train_file, data.dataset_name, data.block_size) == (None, None, 128)
    assert run.sample_prompt == "ROMEO:"


def test_finetune_defaults_to_the_main_job_output():
    model, _, training, _ = parse_arguments(FINETUNE_ARGUMENTS, finetune.DEFAULTS, [])
    assert model.model_name_or_path == pretrain_moe.DEFAULTS["output_dir"]
    assert training.output_dir != model.model_name_or_path


@pytest.mark.parametrize("recipe", [compare_optimizers, compare_balancing])
def test_comparisons_keep_no_checkpoints_evaluate_once_and_sample_nothing_by_default(recipe):
    parsed = parse_arguments((recipe.ComparisonArguments, *pretrain_moe.ARGUMENTS), recipe.DEFAULTS, [])
    training, run = parsed[3], parsed[4]
    assert (plain(training.save_strategy), plain(training.eval_strategy)) == ("no", "no")
    assert run.sample_prompt == ""
    assert training.output_dir == f"outputs/{recipe.__name__}"


def test_comparison_arguments_validate():
    assert compare_optimizers.ComparisonArguments().optimizers[0] == "adamw_torch"  # the step-time reference
    assert set(hf_signopt.SIGN_OPTIMIZERS) <= set(compare_optimizers.ComparisonArguments().optimizers)
    with pytest.raises(ValueError, match="distinct optimizers"):
        compare_optimizers.ComparisonArguments(optimizers=["lion", "lion"])
    with pytest.raises(ValueError, match="learning_rates has 1 values for 2 optimizers"):
        compare_optimizers.ComparisonArguments(optimizers=["lion", "simba"], learning_rates=[0.1])
    assert compare_balancing.ComparisonArguments().modes == ["none", "aux-loss", "loss-free"]
    with pytest.raises(ValueError, match="modes must be distinct names"):
        compare_balancing.ComparisonArguments(modes=["loss-free", "aux_loss"])
