"""How the recipes turn model arguments into a `LossFreeMoeConfig` and balancing callbacks."""

import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from hf_signopt import LossFreeBalanceCallback, LossFreeMoeConfig, LossFreeMoeForCausalLM


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
from recipe_moe import (  # noqa: E402
    MIXTRAL_AUX_LOSS_COEF,
    SMALL_MOE,
    MoeModelArguments,
    balancing_callbacks,
    build_moe_config,
    routing_summary,
    scale_router_learning_rate,
)


SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def test_default_is_the_small_moe_sized_to_the_tokenizer_and_blocks():
    config = build_moe_config(MoeModelArguments(), vocab_size=2048, block_size=128, special_ids=SPECIAL)
    assert isinstance(config, LossFreeMoeConfig)
    for name, value in SMALL_MOE.items():
        assert getattr(config, name) == value, name
    assert (config.vocab_size, config.max_position_embeddings) == (2048, 128)
    assert config.router_aux_loss_coef == 0.0 and config.output_router_logits is False


def test_explicit_fields_override_a_starting_config(tmp_path):
    LossFreeMoeConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, num_local_experts=6, num_experts_per_tok=3,
                      max_position_embeddings=512).save_pretrained(tmp_path)
    args = MoeModelArguments(config_name=str(tmp_path), num_local_experts=12, router_score_func="sigmoid")
    config = build_moe_config(args, vocab_size=300, block_size=64, special_ids=SPECIAL)
    assert (config.hidden_size, config.num_hidden_layers, config.num_experts_per_tok) == (64, 3, 3)
    assert (config.num_local_experts, config.router_score_func) == (12, "sigmoid")
    assert (config.vocab_size, config.max_position_embeddings) == (300, 512)


def test_balancing_modes():
    aux = build_moe_config(MoeModelArguments(balancing="aux-loss"), 300, 32, SPECIAL)
    assert aux.router_aux_loss_coef == MIXTRAL_AUX_LOSS_COEF == 0.02 and aux.output_router_logits is True
    custom = build_moe_config(MoeModelArguments(balancing="aux-loss", router_aux_loss_coef=0.02), 300, 32, SPECIAL)
    assert custom.router_aux_loss_coef == 0.02
    assert [type(c) for c in balancing_callbacks("loss-free")] == [LossFreeBalanceCallback]
    assert balancing_callbacks("aux-loss") == balancing_callbacks("none") == []
    summary = routing_summary(aux, "aux-loss")
    assert summary == {"balancing": "aux-loss", "score_func": "softmax", "update_rule": "sign", "update_rate": 0.001,
                       "aux_loss_coef": 0.02, "num_experts": 8, "top_k": 2}


def test_invalid_sizes_are_reported_by_the_config():
    with pytest.raises(StrictDataclassError, match="num_experts_per_tok"):
        build_moe_config(MoeModelArguments(num_local_experts=2, num_experts_per_tok=3), 300, 32, SPECIAL)


def test_router_weights_get_their_own_groups_at_the_ratio_of_the_learning_rate():
    config = build_moe_config(MoeModelArguments(hidden_size=32, intermediate_size=32, num_hidden_layers=2), 64, 16,
                              SPECIAL)
    model = LossFreeMoeForCausalLM(config)
    routers = [layer.mlp.gate.weight for layer in model.model.layers]
    names = {id(p): n for n, p in model.named_parameters()}
    decay = [p for n, p in model.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if "norm" in n]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=2e-3, momentum=0.9)
    scale_router_learning_rate(optimizer, model, 0.25)
    groups = optimizer.param_groups
    assert len(groups) == 3
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in routers}
    assert (groups[2]["lr"], groups[2]["weight_decay"], groups[2]["momentum"]) == (2e-3 * 0.25, 0.1, 0.9)
    assert [g["lr"] for g in groups[:2]] == [2e-3, 2e-3]
    every = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(every) == sorted(names.values())  # each parameter exactly once
    unchanged = torch.optim.SGD(model.parameters(), lr=1.0)
    scale_router_learning_rate(unchanged, model, 1.0)
    assert len(unchanged.param_groups) == 1


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_router_learning_rate_ratio_outside_its_range_is_rejected(ratio):
    with pytest.raises(ValueError, match=rf"router_learning_rate_ratio must be in \(0, 1\], got {ratio}"):
        MoeModelArguments(router_learning_rate_ratio=ratio)
