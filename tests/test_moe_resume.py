"""Checkpoints in Mixtral's Hub format load back through a plain `load_state_dict`, as `Trainer` reloads them.

`save_pretrained` writes each MoE block as `block_sparse_moe.*` with per-expert `w1` (gate), `w3` (up) and `w2`
(down) weights. The model keeps them fused: `experts.gate_up_proj[e]` is w1 on top of w3, `experts.down_proj[e]`
is w2. These tests check `load_state_dict` against that layout, written out here, and against `from_pretrained`.
"""

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import load_sharded_checkpoint

from hf_signopt import LossFreeBalanceCallback, LossFreeMoeConfig, LossFreeMoeForCausalLM, LossFreeMoeModel

TINY = dict(
    vocab_size=48, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
)
INTERMEDIATE = TINY["intermediate_size"]


def tiny_model(seed, model_class=LossFreeMoeForCausalLM):
    torch.manual_seed(seed)
    model = model_class(LossFreeMoeConfig(**TINY))
    with torch.no_grad():
        for layer in model.modules():
            if hasattr(layer, "e_score_correction_bias"):
                layer.e_score_correction_bias.uniform_(-0.1, 0.1)
    return model


def saved_hub_state(model, path):
    """Saves `model` with `save_pretrained` and returns the file's state dict (Hub names)."""
    model.save_pretrained(path)
    state = load_file(path / "model.safetensors")
    assert any(".block_sparse_moe.experts.0.w1.weight" in key for key in state)
    return state


def assert_same_state(model, reference):
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_hub_state_dict_loads_like_from_pretrained(tmp_path):
    source = tiny_model(seed=0)
    hub = saved_hub_state(source, tmp_path)
    target = tiny_model(seed=1)
    result = target.load_state_dict(hub)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for layer in range(TINY["num_hidden_layers"]):
        mlp = target.model.layers[layer].mlp
        hub_block = f"model.layers.{layer}.block_sparse_moe."
        for expert in range(TINY["num_local_experts"]):
            w1, w2, w3 = (hub[f"{hub_block}experts.{expert}.{w}.weight"] for w in ("w1", "w2", "w3"))
            assert torch.equal(mlp.experts.gate_up_proj[expert, :INTERMEDIATE], w1)
            assert torch.equal(mlp.experts.gate_up_proj[expert, INTERMEDIATE:], w3)
            assert torch.equal(mlp.experts.down_proj[expert], w2)
        assert torch.equal(mlp.gate.weight, hub[hub_block + "gate.weight"])
        assert torch.equal(mlp.gate.e_score_correction_bias, hub[hub_block + "gate.e_score_correction_bias"])
    assert_same_state(target, LossFreeMoeForCausalLM.from_pretrained(tmp_path))
    assert_same_state(target, source)


def test_native_state_dict_still_loads():
    target = tiny_model(seed=1)
    target.load_state_dict(tiny_model(seed=0).state_dict())
    assert_same_state(target, tiny_model(seed=0))


def test_hub_keys_under_a_wrapper_prefix_and_into_the_base_model(tmp_path):
    source = tiny_model(seed=0)
    hub = saved_hub_state(source, tmp_path)
    wrapper = nn.ModuleDict({"module": tiny_model(seed=1)})  # keys as DDP's wrapper names them
    wrapper.load_state_dict({"module." + key: tensor for key, tensor in hub.items()})
    assert_same_state(wrapper["module"], source)
    base = tiny_model(seed=1, model_class=LossFreeMoeModel)
    base.load_state_dict({key.removeprefix("model."): t for key, t in hub.items() if key.startswith("model.")})
    assert_same_state(base, source.model)


def test_a_state_dict_with_part_of_the_experts_names_the_missing_pieces(tmp_path):
    hub = saved_hub_state(tiny_model(seed=0), tmp_path)
    block0, block1 = "model.layers.0.block_sparse_moe.experts.", "model.layers.1.block_sparse_moe.experts."
    dropped = [block1 + "2.w3.weight", block0 + "0.w2.weight"]
    partial = {key: tensor for key, tensor in hub.items() if key not in dropped}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*experts\.0\.w2\..*experts\.2\.w3"):
        tiny_model(seed=1).load_state_dict(partial)
    target, before = tiny_model(seed=1), tiny_model(seed=1)
    result = target.load_state_dict(partial, strict=False)
    assert sorted(result.missing_keys) == sorted(dropped)
    experts = target.model.layers[1].mlp.experts
    old = before.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(experts.gate_up_proj[2, :INTERMEDIATE], hub[block1 + "2.w1.weight"])
    assert torch.equal(experts.gate_up_proj[2, INTERMEDIATE:], old[2, INTERMEDIATE:])  # kept, not zeroed
    assert torch.equal(target.model.layers[0].mlp.experts.down_proj[0], before.model.layers[0].mlp.experts.down_proj[0])
    assert torch.equal(experts.gate_up_proj[3, INTERMEDIATE:], hub[block1 + "3.w3.weight"])
    # the missing piece arrives in a second call (the next shard) and completes the tensor
    second = target.load_state_dict({dropped[0]: hub[dropped[0]]}, strict=False)
    hub_block = "model.layers.1.block_sparse_moe.experts."
    others = {f"{hub_block}{e}.{w}.weight" for e, w in itertools.product(range(4), ("w1", "w3"))} - {dropped[0]}
    assert {key for key in second.missing_keys if "block_sparse_moe" in key} == others
    assert "model.layers.1.mlp.experts.gate_up_proj" not in second.missing_keys
    for expert in range(4):
        w1, w3 = hub[f"{hub_block}{expert}.w1.weight"], hub[f"{hub_block}{expert}.w3.weight"]
        assert torch.equal(experts.gate_up_proj[expert], torch.cat([w1, w3]))


def test_sharded_checkpoint_with_expert_pieces_split_across_shards(tmp_path):
    source = tiny_model(seed=0)
    source.save_pretrained(tmp_path, max_shard_size="4KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    block = "model.layers.0.block_sparse_moe.experts."
    assert any(weight_map[f"{block}{e}.w1.weight"] != weight_map[f"{block}{e}.w3.weight"] for e in range(4))
    target = tiny_model(seed=1)
    load_sharded_checkpoint(target, tmp_path, strict=False)
    assert_same_state(target, source)


def test_bad_hub_keys_are_reported():
    model = tiny_model(seed=0)
    block = "model.layers.0.block_sparse_moe."
    result = model.load_state_dict({block + "experts.9.w1.weight": torch.zeros(INTERMEDIATE, 32)}, strict=False)
    assert result.unexpected_keys == [block + "experts.9.w1.weight"]
    with pytest.raises(RuntimeError, match=r"size mismatch for .*experts\.1\.w2\.weight: .*\[32, 5\].*\[32, 24\]"):
        model.load_state_dict({block + "experts.1.w2.weight": torch.zeros(32, 5)}, strict=False)
    both = {block + "gate.weight": torch.zeros(4, 32), "model.layers.0.mlp.gate.weight": torch.zeros(4, 32)}
    with pytest.raises(RuntimeError, match=r"holds both .*block_sparse_moe\.gate\.weight and .*mlp\.gate\.weight"):
        model.load_state_dict(both, strict=False)


@pytest.mark.e2e
def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path):
    generator = torch.Generator().manual_seed(1)
    rows = torch.randint(0, TINY["vocab_size"], (24, 12), generator=generator)
    data = [{"input_ids": row, "labels": row} for row in rows]
    order = itertools.count()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=4, learning_rate=1e-2,
        max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
        load_best_model_at_end=True, metric_for_best_model="order", greater_is_better=False,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=7,
    )
    model = tiny_model(seed=0)
    model.config.router_bias_update_rate = 0.05
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
                      compute_metrics=lambda _: {"order": next(order)},  # the first evaluation is the best
                      callbacks=[LossFreeBalanceCallback()])
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = LossFreeMoeForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    last = LossFreeMoeForCausalLM.from_pretrained(tmp_path / "checkpoint-6")
    for name, tensor in best.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "e_score_correction_bias")):
            assert not torch.equal(tensor, last.state_dict()[name]), name  # training moved on after the best
    assert_same_state(model, best)


def test_part_of_the_experts_cannot_be_completed_on_the_meta_device(tmp_path):
    hub = saved_hub_state(tiny_model(seed=0), tmp_path)
    partial = {key: t for key, t in hub.items() if key != "model.layers.0.block_sparse_moe.experts.3.w1.weight"}
    with torch.device("meta"):
        model = LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY))
    with pytest.raises(RuntimeError, match=r"layers\.0\.mlp\.experts\.gate_up_proj is on the meta .*experts\.3\.w1"):
        model.load_state_dict(partial, strict=False, assign=True)
    model.load_state_dict(hub, assign=True)  # complete pieces need no current value
    assert_same_state(model, tiny_model(seed=0))
