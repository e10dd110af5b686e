"""LossFreeMoeForCausalLM in training: gradients, gradient checkpointing, and Mixtral's aux-loss baseline."""

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig, MixtralForCausalLM

from hf_signopt import LossFreeMoeConfig, LossFreeMoeForCausalLM, LossFreeMoeTopKRouter
from moe_tiny import TINY_MOE

TINY = {**TINY_MOE}


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LossFreeMoeForCausalLM(LossFreeMoeConfig(**{**TINY, **overrides}))
    for router in model.modules():
        if isinstance(router, LossFreeMoeTopKRouter):
            router.e_score_correction_bias.copy_(torch.tensor([0.05, -0.05, 0.02, 0.0]))
    return model.train()


def loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_bias_gets_no_gradient_and_weights_do():
    model = build()
    ids = torch.randint(0, 64, (2, 8))
    _, grads = loss_and_grads(model, ids)
    gate = model.model.layers[0].mlp.gate
    assert gate.e_score_correction_bias.grad is None and not gate.e_score_correction_bias.requires_grad
    assert grads["model.layers.0.mlp.gate.weight"].abs().sum() > 0
    assert grads["model.layers.1.mlp.experts.gate_up_proj"].abs().sum() > 0


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_gradient_checkpointing_recomputes_routing_and_matches(score_func):
    ids = torch.randint(0, 64, (2, 8))
    plain = build(router_score_func=score_func)
    loss, grads = loss_and_grads(plain, ids)

    checkpointed = build(router_score_func=score_func)
    checkpointed.activation_checkpointing_enable()
    calls = []
    for router in checkpointed.modules():
        if isinstance(router, LossFreeMoeTopKRouter):
            router.register_forward_hook(lambda *_: calls.append(1))
    ckpt_loss, ckpt_grads = loss_and_grads(checkpointed, ids)

    assert len(calls) == 2 * TINY["num_hidden_layers"], "each router runs again in the backward pass"
    torch.testing.assert_close(ckpt_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, msg=name)
    assert checkpointed.model.layers[0].mlp.gate.e_score_correction_bias.grad is None


def switch_aux_loss(router_logits, num_experts, top_k):
    """Mixtral's load-balancing loss (Switch Transformer eq. 4-6) over all layers' tokens, written out here."""
    probs = torch.cat([torch.softmax(logits.float(), dim=-1) for logits in router_logits])
    chosen = torch.zeros_like(probs)
    for row, top in enumerate(probs.argsort(dim=-1, descending=True)[:, :top_k]):
        chosen[row, top] = 1.0
    fraction_routed = chosen.mean(dim=0)
    mean_prob = probs.mean(dim=0)
    return num_experts * (fraction_routed * mean_prob).sum()


def test_aux_loss_baseline_is_mixtrals_loss():
    ids = torch.randint(0, 64, (2, 8))
    model = build(router_aux_loss_coef=0.02)
    out = model(input_ids=ids, labels=ids, output_router_logits=True)

    assert len(out.router_logits) == TINY["num_hidden_layers"]
    aux = switch_aux_loss(out.router_logits, num_experts=4, top_k=2)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, lm + 0.02 * aux)

    # The aux loss ignores the bias: Mixtral with the same weights computes the same one; with a zero bias
    # (where routing is Mixtral's) the total loss is Mixtral's too.
    mixtral = MixtralForCausalLM(MixtralConfig(**TINY, router_aux_loss_coef=0.02)).train()
    mixtral.load_state_dict(model.state_dict(), strict=False)
    mixtral_out = mixtral(input_ids=ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(mixtral_out.aux_loss, out.aux_loss)
    for router in model.modules():
        if isinstance(router, LossFreeMoeTopKRouter):
            router.e_score_correction_bias.zero_()
    torch.testing.assert_close(model(input_ids=ids, labels=ids, output_router_logits=True).loss, mixtral_out.loss)


def test_default_coefficient_adds_no_aux_loss():
    ids = torch.randint(0, 64, (2, 8))
    model = build()
    with_logits = model(input_ids=ids, labels=ids, output_router_logits=True)
    without = model(input_ids=ids, labels=ids)
    assert with_logits.aux_loss > 0 and without.aux_loss is None
    torch.testing.assert_close(with_logits.loss, without.loss)
