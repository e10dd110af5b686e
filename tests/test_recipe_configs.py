"""The config files shipped in recipes/configs/ parse with their recipe's arguments."""

import sys
from pathlib import Path

import pytest


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
sys.path.insert(0, str(RECIPES))
import compare_balancing  # noqa: E402
import compare_optimizers  # noqa: E402
import finetune  # noqa: E402
import pretrain_moe  # noqa: E402
from recipe_arguments import load_config_file, parse_recipe_arguments  # noqa: E402


@pytest.mark.parametrize(
    ("recipe", "config"),
    [
        (pretrain_moe, "pretrain_moe.yaml"),
        (finetune, "finetune.json"),
        (compare_optimizers, "compare_optimizers.yaml"),
        (compare_balancing, "compare_balancing.yaml"),
    ],
)
def test_shipped_config_sets_every_value_it_names(recipe, config):
    path = RECIPES / "configs" / config
    parsed = parse_recipe_arguments(recipe.ARGUMENT_TYPES, recipe.DEFAULTS, [str(path)])
    for name, value in load_config_file(path).items():
        holder = next(args for args in parsed if hasattr(args, name))
        actual = getattr(holder, name)
        assert getattr(actual, "value", actual) == value, name


def test_main_job_config_writes_out_the_built_in_defaults():
    path = RECIPES / "configs" / "pretrain_moe.yaml"
    from_file = parse_recipe_arguments(pretrain_moe.ARGUMENT_TYPES, pretrain_moe.DEFAULTS, [str(path)])
    built_in = parse_recipe_arguments(pretrain_moe.ARGUMENT_TYPES, pretrain_moe.DEFAULTS, [])
    model_file, data_file, training_file, recipe_file = from_file
    model_default, data_default, training_default, recipe_default = built_in
    assert data_file == data_default and recipe_file == recipe_default
    # The file spells out the small default model; the built-in leaves those fields to SMALL_MOE.
    from recipe_moe import SMALL_MOE
    assert {name: getattr(model_file, name) for name in SMALL_MOE} == SMALL_MOE
    for name in pretrain_moe.DEFAULTS:
        assert getattr(training_file, name) == getattr(training_default, name), name
