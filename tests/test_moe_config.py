"""LossFreeMoeConfig: defaults, validation of every field, serialization, Auto registration, Mixtral configs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, MixtralConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_signopt
from hf_signopt import LossFreeMoeConfig, LossFreeMoeForCausalLM
from moe_tiny import TINY_MOE

TINY = {**TINY_MOE}


def tiny(**overrides) -> LossFreeMoeConfig:
    return LossFreeMoeConfig(**{**TINY, **overrides})


def test_defaults_are_mixtral_plus_router_fields():
    config = LossFreeMoeConfig()
    mixtral = MixtralConfig()
    assert config.model_type == "lossfree_moe"
    assert isinstance(config, MixtralConfig)
    assert config.router_score_func == "softmax"
    assert config.norm_topk_prob is True
    assert config.router_bias_update_rate == 0.005
    assert config.router_bias_update_rule == "linear"
    assert config.router_aux_loss_coef == 0.0
    for name in ("hidden_size", "num_local_experts", "num_experts_per_tok", "router_jitter_noise", "vocab_size"):
        assert getattr(config, name) == getattr(mixtral, name)
    assert config.num_experts == config.num_local_experts  # Mixtral's attribute alias still works


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"router_score_func": "tanh"}, r"router_score_func.*\('softmax', 'sigmoid'\).*'tanh'"),
        ({"router_bias_update_rule": "adam"}, r"router_bias_update_rule.*\('sign', 'rms', 'linear'\).*'adam'"),
        ({"router_bias_update_rate": -0.1}, r"router_bias_update_rate.*finite number >= 0.*-0\.1"),
        ({"router_bias_update_rate": math.nan}, r"router_bias_update_rate.*finite number >= 0.*nan"),
        ({"router_bias_update_rate": math.inf}, r"router_bias_update_rate.*finite number >= 0.*inf"),
        ({"router_aux_loss_coef": -1.0}, r"router_aux_loss_coef.*\[0\.0, inf\).*-1\.0"),
        ({"router_jitter_noise": 1.0}, r"router_jitter_noise.*\[0\.0, 1\.0\).*1\.0"),
        ({"router_jitter_noise": -0.5}, r"router_jitter_noise.*\[0\.0, 1\.0\).*-0\.5"),
        ({"num_local_experts": 0, "num_experts_per_tok": 0}, r"num_local_experts.*>= 1.*0"),
        ({"num_experts_per_tok": 0}, r"num_experts_per_tok.*\[1, num_local_experts=4\].*0"),
        ({"num_experts_per_tok": 5}, r"num_experts_per_tok.*\[1, num_local_experts=4\].*5"),
        ({"vocab_size": 0}, r"vocab_size.*>= 1.*0"),
        ({"hidden_size": -32}, r"hidden_size.*>= 1.*-32"),
        ({"intermediate_size": 0}, r"intermediate_size.*>= 1.*0"),
        ({"num_hidden_layers": 0}, r"num_hidden_layers.*>= 1.*0"),
        ({"num_attention_heads": 0}, r"num_attention_heads.*>= 1.*0"),
        ({"max_position_embeddings": 0}, r"max_position_embeddings.*>= 1.*0"),
        ({"num_key_value_heads": 3}, r"num_key_value_heads.*divide num_attention_heads=4.*\[1, 4\].*3"),
        ({"num_key_value_heads": 8}, r"num_key_value_heads.*divide num_attention_heads=4.*\[1, 4\].*8"),
        ({"num_key_value_heads": 0}, r"num_key_value_heads.*\[1, 4\].*0"),
        ({"hidden_size": 30}, r"hidden_size.*\(30\).*multiple of num_attention_heads \(4\)"),
        ({"head_dim": 3}, r"head dimension.*even integer >= 2.*3"),
        ({"sliding_window": 0}, r"sliding_window.*>= 1.*0"),
        ({"hidden_act": "nope"}, r"hidden_act.*one of.*silu.*'nope'"),
        ({"rms_norm_eps": 0.0}, r"rms_norm_eps.*> 0.*0\.0"),
        ({"initializer_range": -0.02}, r"initializer_range.*\[0\.0, inf\).*-0\.02"),
        ({"attention_dropout": 1.5}, r"attention_dropout.*\[0\.0, 1\.0\].*1\.5"),
    ],
)
def test_each_bad_value_gets_a_clear_error(overrides, expected):
    with pytest.raises(StrictDataclassError, match=expected) as info:
        tiny(**overrides)
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize(
    "overrides",
    [
        {"router_bias_update_rate": "0.1"},
        {"router_score_func": 1},
        {"norm_topk_prob": "yes"},
        {"num_local_experts": 4.0},
    ],
)
def test_wrong_types_are_rejected(overrides):
    with pytest.raises(StrictDataclassError, match=next(iter(overrides))):
        tiny(**overrides)


def test_edge_values_are_accepted():
    config = tiny(
        router_bias_update_rate=0,  # an int is fine, 0 freezes the bias
        router_aux_loss_coef=0.02,
        num_experts_per_tok=4,  # top-k == number of experts
        num_key_value_heads=4,
        head_dim=6,  # explicit head_dim need not divide hidden_size
        router_score_func="sigmoid",
        router_bias_update_rule="rms",
        norm_topk_prob=False,
    )
    assert config.router_bias_update_rate == 0
    assert config.num_experts_per_tok == config.num_local_experts


def test_edits_after_construction_are_caught_before_use(tmp_path):
    config = tiny()
    config.router_bias_update_rule = "adamw"  # strict checks the type on assignment, the value on use
    with pytest.raises(StrictDataclassError, match="adamw"):
        config.save_pretrained(tmp_path)
    with pytest.raises(StrictDataclassError, match="adamw"):
        LossFreeMoeForCausalLM(config)
    with pytest.raises(StrictDataclassError, match="router_bias_update_rate"):
        config.router_bias_update_rate = "fast"


@pytest.mark.parametrize(
    ("name", "value"),
    [("router_bias_update_rate", -1.0), ("router_bias_update_rate", True), ("router_score_func", "tanh"),
     ("router_aux_loss_coef", math.inf)],
)
def test_own_fields_are_checked_when_set(name, value):
    config = tiny()
    before = getattr(config, name)
    with pytest.raises(StrictDataclassError, match=name):
        setattr(config, name, value)
    assert getattr(config, name) == before


def test_save_load_round_trip_and_auto_config(tmp_path):
    config = tiny(router_score_func="sigmoid", router_bias_update_rate=0.003, router_bias_update_rule="linear")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "lossfree_moe"
    assert saved["router_bias_update_rule"] == "linear"

    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is LossFreeMoeConfig
    for name in ("router_score_func", "router_bias_update_rate", "router_bias_update_rule", "num_local_experts"):
        assert getattr(loaded, name) == getattr(config, name)
    assert isinstance(AutoConfig.for_model("lossfree_moe", **TINY), LossFreeMoeConfig)


FRESH_INTERPRETER = """
from transformers import AutoConfig, AutoModelForCausalLM
try:
    AutoConfig.for_model("lossfree_moe")
    raise SystemExit("lossfree_moe resolved before importing hf_signopt")
except ValueError:
    pass
import hf_signopt
config = AutoConfig.for_model("lossfree_moe", vocab_size=64, hidden_size=32, intermediate_size=48,
    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)
print(type(config).__name__, type(AutoModelForCausalLM.from_config(config)).__name__)
"""


def test_import_alone_registers_the_model_type():
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_INTERPRETER], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["LossFreeMoeConfig", "LossFreeMoeForCausalLM"]


def test_registration_is_idempotent():
    hf_signopt.register_lossfree_moe()
    hf_signopt.register_lossfree_moe()
    assert CONFIG_MAPPING["lossfree_moe"] is LossFreeMoeConfig


def test_mixtral_config_is_converted_to_lossfree_moe(tmp_path):
    MixtralConfig(**TINY, router_aux_loss_coef=0.02).save_pretrained(tmp_path / "mixtral")
    config = LossFreeMoeConfig.from_pretrained(tmp_path / "mixtral")
    assert config.model_type == "lossfree_moe"  # the instance no longer claims to be Mixtral
    assert config.router_aux_loss_coef == 0.02  # values written in the checkpoint are kept
    assert config.router_bias_update_rule == "linear"  # new fields take their defaults
    config.save_pretrained(tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["model_type"] == "lossfree_moe"
    assert type(AutoConfig.from_pretrained(tmp_path / "converted")) is LossFreeMoeConfig
