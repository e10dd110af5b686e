"""The main job's model arguments (recipes/pretrain_moe.py): the config they build, the balancing, the router rate."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import MixtralConfig

from hf_signopt import LossFreeMoeConfig, LossFreeMoeForCausalLM
import pretrain_moe
from pretrain_moe import ModelArguments, language_modeling_loss_only, with_router_lr_ratio
from recipe_utils import parse_arguments


REPO = Path(__file__).resolve().parent.parent
SMALL_MOE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, router_score_func="softmax")
"""The main job's model, as its docstring describes it: 4 layers x 8 experts, top-2."""


class Tokenizer:
    """What `build_config` reads of a tokenizer."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


@pytest.fixture
def saved_config(tmp_path):
    LossFreeMoeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, num_local_experts=6, num_experts_per_tok=3, router_score_func="sigmoid",
                      max_position_embeddings=512).save_pretrained(tmp_path)
    return tmp_path


def test_default_is_the_small_moe_sized_to_the_tokenizer_and_blocks():
    config = ModelArguments().build_config(Tokenizer(2048), block_size=128)
    assert isinstance(config, LossFreeMoeConfig)
    for name, value in SMALL_MOE.items():
        assert getattr(config, name) == value, name
    assert (config.vocab_size, config.max_position_embeddings) == (2048, 128)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert (config.router_bias_update_rule, config.router_bias_update_rate) == ("sign", 0.001)
    assert config.router_aux_loss_coef == 0.0 and config.output_router_logits is False
    # 3.9M parameters with the 2048-token vocabulary, as the recipe's docstring says.
    assert round(sum(p.numel() for p in LossFreeMoeForCausalLM(config).parameters()) / 1e6, 1) == 3.9


def test_size_flags_build_the_model():
    args = ModelArguments(hidden_size=32, num_hidden_layers=2, num_local_experts=4, router_score_func="sigmoid")
    config = args.build_config(Tokenizer(300), block_size=64)
    assert (config.hidden_size, config.num_hidden_layers, config.num_local_experts) == (32, 2, 4)
    assert (config.router_score_func, config.num_experts_per_tok, config.max_position_embeddings) == ("sigmoid", 2, 64)


@pytest.mark.parametrize("source", ["dir", "config.json"])
def test_config_name_starts_from_a_saved_config_and_overrides_apply_on_top(saved_config, source):
    name = str(saved_config if source == "dir" else saved_config / "config.json")
    config = ModelArguments(config_name=name).build_config(Tokenizer(300), block_size=64)
    assert (config.hidden_size, config.num_hidden_layers, config.num_local_experts) == (64, 3, 6)
    assert (config.num_experts_per_tok, config.router_score_func) == (3, "sigmoid")
    # The tokenizer sets the vocabulary; the config's longer context is kept.
    assert (config.vocab_size, config.max_position_embeddings) == (300, 512)
    changed = ModelArguments(config_name=name, config_overrides="num_hidden_layers=2,num_local_experts=12,"
                                                                "router_score_func=softmax")
    config = changed.build_config(Tokenizer(300), block_size=1024)
    assert (config.hidden_size, config.num_hidden_layers, config.num_local_experts) == (64, 2, 12)
    assert (config.router_score_func, config.max_position_embeddings) == ("softmax", 1024)


def test_config_name_of_another_moe_family(tmp_path):
    MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=1).save_pretrained(tmp_path)
    config = ModelArguments(config_name=str(tmp_path), balancing="aux-loss").build_config(Tokenizer(300), 32)
    assert isinstance(config, LossFreeMoeConfig) and config.model_type == "lossfree_moe"
    assert (config.hidden_size, config.num_local_experts, config.num_experts_per_tok) == (64, 4, 1)
    assert (config.router_aux_loss_coef, config.output_router_logits) == (0.02, True)


def test_config_name_with_a_changed_size_flag_is_refused(saved_config):
    with pytest.raises(ValueError, match=r"--config_name sets the model.*\['--num_local_experts', "
                                         r"'--router_score_func'\].*--config_overrides 'num_local_experts=\.\.\.'"):
        ModelArguments(config_name=str(saved_config), num_local_experts=12, router_score_func="sigmoid")
    with pytest.raises(ValueError, match=r"\['--hidden_size'\] would be ignored"):
        parse_arguments(pretrain_moe.ARGUMENTS, pretrain_moe.DEFAULTS,
                        ["--config_name", str(saved_config), "--hidden_size", "32"])
    # The balancing fields apply whatever the model's source, so they may change.
    assert ModelArguments(config_name=str(saved_config), balancing="none", router_bias_update_rule="rms")
    with pytest.raises(ValueError, match="--config_overrides changes a --config_name"):
        ModelArguments(config_overrides="num_hidden_layers=2")


@pytest.mark.parametrize(("balancing", "rate", "aux_loss_coef"), [
    ("loss-free", 0.01, 0.0),
    ("aux-loss", 0.0, 0.02),  # Mixtral-8x7B's coefficient by default
    ("none", 0.0, 0.0),
])
def test_balancing_modes(balancing, rate, aux_loss_coef):
    args = ModelArguments(balancing=balancing, router_bias_update_rate=0.01, router_bias_update_rule="linear")
    config = args.build_config(Tokenizer(300), 32)
    assert (config.router_bias_update_rate, config.router_aux_loss_coef) == (rate, aux_loss_coef)
    assert config.output_router_logits is (balancing == "aux-loss")
    assert config.router_bias_update_rule == "linear"  # kept: every mode counts the loads the same way
    custom = ModelArguments(balancing="aux-loss", router_aux_loss_coef=0.001).build_config(Tokenizer(300), 32)
    assert custom.router_aux_loss_coef == 0.001


def test_model_arguments_validate():
    with pytest.raises(ValueError, match="balancing must be one of .*got 'auxloss'"):
        ModelArguments(balancing="auxloss")
    with pytest.raises(ValueError, match="needs router_aux_loss_coef > 0, got 0.0"):
        ModelArguments(balancing="aux-loss", router_aux_loss_coef=0.0)
    with pytest.raises(StrictDataclassError, match="num_experts_per_tok"):
        ModelArguments(num_local_experts=2, num_experts_per_tok=3).build_config(Tokenizer(300), 32)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_router_learning_rate_ratio_outside_its_range_is_rejected(ratio):
    with pytest.raises(ValueError, match=rf"router_learning_rate_ratio must be in \(0, 1\], got {ratio}"):
        ModelArguments(router_learning_rate_ratio=ratio)


def tiny_model() -> LossFreeMoeForCausalLM:
    args = ModelArguments(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_local_experts=4)
    return LossFreeMoeForCausalLM(args.build_config(Tokenizer(64), 16))


def test_the_router_ratio_becomes_the_library_s_optim_args_key():
    assert with_router_lr_ratio(None, 0.1) == "router_lr_ratio=0.1"
    assert with_router_lr_ratio("window_size=64", 0.25) == "window_size=64,router_lr_ratio=0.25"
    assert with_router_lr_ratio("window_size=64", 1.0) == "window_size=64"  # all at the learning rate
    with pytest.raises(ValueError, match="once: --router_learning_rate_ratio or router_lr_ratio"):
        with_router_lr_ratio("router_lr_ratio=0.5", 0.1)


def test_evaluation_leaves_out_the_auxiliary_loss_and_restores_the_setting():
    model = tiny_model()
    model.config.output_router_logits = True
    with language_modeling_loss_only(model):
        assert model.config.output_router_logits is False
    assert model.config.output_router_logits is True
    with pytest.raises(RuntimeError), language_modeling_loss_only(model):
        raise RuntimeError
    assert model.config.output_router_logits is True


def test_help_shows_the_defaults_a_run_uses():
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "recipes/pretrain_moe.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = " ".join(result.stdout.split())  # argparse wraps the help to the terminal's width

    def shown_default(flag: str) -> str:
        # The option's entry (not the usage line's `[--flag ...]`) up to the first `(default: ...)`.
        match = re.search(rf"(?<![\[\w-]){flag} .*?\(default: ([^)]*)\)", text)
        assert match, flag
        return match.group(1)

    assert shown_default("--num_experts_per_tok") == "2"
    assert shown_default("--router_bias_update_rule") == "sign"
    assert shown_default("--num_local_experts") == "8"
    assert shown_default("--balancing") == "loss-free"
    assert shown_default("--optim") == "simba"
    assert shown_default("--learning_rate") == "0.002"
    assert shown_default("--max_steps") == "500"
    assert shown_default("--output_dir") == "outputs/pretrain_moe"
    assert shown_default("--save_strategy") == "steps"
