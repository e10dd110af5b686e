"""Native-bias families whose bias is not on the module that chooses the experts balance too.

MiniMax-M2 and HY-V3 keep `e_score_correction_bias` on the MoE block and pass it to the gate; Ernie 4.5 keeps a
`(1, num_experts)` bias on `gate.moe_statics`. The balancer counts at the gate and updates the bias where it lives.
Ernie 4.5 VL has a text and a vision MoE per layer; fed text only, its vision routers see no token and stay put.
"""

import pytest
import torch
import transformers

import hf_signopt
from hf_signopt.moe.balancer import BIAS_NAME, find_routers
from test_moe_callback import assert_updated

RATE = 0.01
SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)
FAMILIES = {
    "minimax_m2": ("MiniMaxM2", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16), "mlp.gate"),
    "hy_v3": ("HYV3", dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16),
              "mlp.gate"),
    "ernie4_5_moe": ("Ernie4_5_Moe", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
                                          moe_layer_start_index=0), "mlp.gate"),
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoe", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=[16, 16],
                                               moe_num_shared_experts=0, rope_parameters={
                                                   "rope_type": "default", "rope_theta": 1e4, "mrope_section": [3, 3, 2]
                                               }), "_moe.gate"),
}


def tiny(family):
    prefix, fields, _ = FAMILIES[family]
    torch.manual_seed(0)
    if family == "ernie4_5_vl_moe":
        vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, patch_size=2, spatial_merge_size=2)
        config = transformers.Ernie4_5_VLMoeConfig(text_config={**SMALL, **fields}, vision_config=vision)
        return transformers.Ernie4_5_VLMoeForConditionalGeneration(config).train()
    config = getattr(transformers, f"{prefix}Config")(**SMALL, **fields)
    return getattr(transformers, f"{prefix}ForCausalLM")(config).train()


@pytest.mark.parametrize("family", FAMILIES)
def test_bias_held_away_from_the_gate_is_balanced(family):
    model = tiny(family)
    gates = [module for name, module in model.named_modules() if name.endswith(FAMILIES[family][2])]
    holders = [module for _, module in find_routers(model)]
    assert gates and len(gates) == len(holders)
    counts = torch.zeros(len(gates), 4, dtype=torch.int64)

    def count(layer):  # an independent count of each gate's own choices
        def hook(module, args, output):
            if torch.is_grad_enabled():
                counts[layer] += torch.bincount(output[2].reshape(-1), minlength=4)

        return hook

    for layer, gate in enumerate(gates):
        gate.register_forward_hook(count(layer))
    balancer = hf_signopt.enable_balancing(model, update_rate=RATE, update_rule="sign")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(2):
        before = torch.stack([getattr(h, BIAS_NAME).detach().reshape(-1).clone() for h in holders])
        counts.zero_()
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        after = torch.stack([getattr(h, BIAS_NAME).detach().reshape(-1) for h in holders])
        routed = len(gates) // 2 if family == "ernie4_5_vl_moe" else len(gates)
        assert counts.sum() == routed * 20 * 2  # text only: the vision routers see nothing and do not move
        assert_updated(after, before, counts, RATE, rule="sign")
    assert balancer.steps_taken == 2
    assert getattr(holders[0], BIAS_NAME).shape == ((1, 4) if family.startswith("ernie") else (4,))  # kept in place
