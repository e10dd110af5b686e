"""LossFreeMoeTopKRouter: the bias picks the experts, the unbiased scores gate them (softmax and sigmoid paths)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_signopt import LossFreeMoeConfig, LossFreeMoeForCausalLM, LossFreeMoeTopKRouter
from moe_tiny import TINY_MOE

TINY = {**TINY_MOE, "num_local_experts": 6}


def reference_routing(hidden, weight, bias, top_k, score_func, norm_topk_prob):
    """Per-token routing written out one token at a time in float64: {expert: gate weight} for each token."""
    routes = []
    for h in hidden.detach().double():
        logits = [float(w @ h) for w in weight.detach().double()]
        if score_func == "softmax":
            exps = [math.exp(x - max(logits)) for x in logits]
            scores = [e / sum(exps) for e in exps]
        else:
            scores = [1.0 / (1.0 + math.exp(-x)) for x in logits]
        chosen = sorted(range(len(scores)), key=lambda e: scores[e] + float(bias[e]), reverse=True)[:top_k]
        total = sum(scores[e] for e in chosen) if norm_topk_prob else 1.0
        routes.append({e: scores[e] / total for e in chosen})
    return routes


def as_routes(top_k_weights, top_k_index):
    return [dict(zip(idx.tolist(), w.tolist())) for idx, w in zip(top_k_index, top_k_weights)]


def assert_routes_equal(actual, expected):
    assert [sorted(r) for r in actual] == [sorted(r) for r in expected]
    for got, want in zip(actual, expected):
        for expert, weight in want.items():
            assert got[expert] == pytest.approx(weight, rel=1e-5, abs=1e-7)


def make_router(score_func="softmax", norm_topk_prob=True, seed=0):
    torch.manual_seed(seed)
    router = LossFreeMoeTopKRouter(
        LossFreeMoeConfig(**TINY, router_score_func=score_func, norm_topk_prob=norm_topk_prob)
    )
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_bias_changes_selection_not_gate_weights(score_func, norm_topk_prob):
    router = make_router(score_func, norm_topk_prob)
    hidden = torch.randn(3, 5, TINY["hidden_size"])  # any leading shape is flattened to tokens
    flat = hidden.reshape(-1, TINY["hidden_size"])

    _, weights0, index0 = router(hidden)
    assert index0.dtype == torch.int64 and index0.shape == (15, 2) and weights0.shape == (15, 2)
    assert weights0.dtype == torch.float32
    unbiased = reference_routing(flat, router.weight, [0.0] * 6, 2, score_func, norm_topk_prob)
    assert_routes_equal(as_routes(weights0, index0), unbiased)

    # Push the least-chosen expert up: scores live in [0, 1], so +1 puts it into every token's top-k.
    least = int(torch.bincount(index0.flatten(), minlength=6).argmin())
    bias = torch.zeros(6)
    bias[least] = 1.0
    bias[(least + 1) % 6] = -0.3
    router.e_score_correction_bias.copy_(bias)
    logits, weights, index = router(hidden)

    assert (index == least).any(dim=-1).all()
    assert not (index0 == least).any(dim=-1).all(), "the bias must have changed some token's selection"
    expected = reference_routing(flat, router.weight, bias.tolist(), 2, score_func, norm_topk_prob)
    assert_routes_equal(as_routes(weights, index), expected)
    # Logits are the plain linear map, untouched by the bias.
    torch.testing.assert_close(logits, flat @ router.weight.T)


def test_softmax_zero_bias_is_mixtral_router_bit_for_bit():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    router = make_router("softmax")
    mixtral = MixtralTopKRouter(LossFreeMoeConfig(**TINY))
    mixtral.weight.data.copy_(router.weight.data)
    hidden = torch.randn(40, TINY["hidden_size"])
    for ours, theirs in zip(router(hidden), mixtral(hidden)):
        assert torch.equal(ours, theirs)


def test_block_output_uses_biased_choice_and_unbiased_gates():
    """The sparse MoE block's output, recomputed expert by expert from the raw weight tensors."""
    torch.manual_seed(1)
    model = LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY, router_score_func="sigmoid"))
    block = model.model.layers[0].mlp
    block.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.8, 0.0, -0.8, 0.0, 0.2]))
    hidden = torch.randn(2, 4, TINY["hidden_size"])
    flat = hidden.reshape(-1, TINY["hidden_size"])

    expected = torch.zeros_like(flat)
    bias = block.gate.e_score_correction_bias.tolist()
    routes = reference_routing(flat, block.gate.weight, bias, 2, "sigmoid", True)
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    for t, route in enumerate(routes):
        for expert, weight in route.items():
            gate, up = (gate_up[expert] @ flat[t]).chunk(2)
            expected[t] += weight * (down[expert] @ (F.silu(gate) * up))
    with torch.no_grad():
        torch.testing.assert_close(block(hidden).reshape(-1, TINY["hidden_size"]), expected, rtol=1e-5, atol=1e-6)
