"""A model whose config asks for balancing balances itself: once per optimizer step, in any loop, no user code."""

import logging

import pytest
import torch
from test_moe_callback import (
    RoutingRecorder,
    bias_snapshot,
    maxvio,
    routers,
    assert_updated,
    tiny_lossfree,
    token_dataset,
    training_args,
)
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Trainer

import hf_signopt
from hf_signopt import LossFreeBalanceCallback, LossFreeBalancer

RATE = 0.05


def batch(seed, rows=4):
    ids = torch.randint(0, 48, (rows, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def plain_loop(model, optimizers, steps, accumulation=1):
    """A plain PyTorch loop that knows nothing of balancing; returns the recorded counts per step."""
    recorder = RoutingRecorder(model, model.config.num_local_experts)
    biases = [bias_snapshot(model)]
    counts = []
    model.train()
    for step in range(steps):
        for micro in range(accumulation):
            model(**batch(10 * step + micro)).loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        counts.append(recorder.train_counts.clone())
        recorder.train_counts.zero_()
        biases.append(bias_snapshot(model))
    return counts, biases


@pytest.mark.parametrize("accumulation", [1, 3])
def test_plain_loop_updates_once_per_optimizer_step(accumulation):
    model = tiny_lossfree(router_bias_update_rate=RATE)
    counts, biases = plain_loop(model, [torch.optim.SGD(model.parameters(), lr=1e-2)], 3, accumulation)
    for step, step_counts in enumerate(counts):
        assert step_counts.sum() == 2 * 2 * 4 * 12 * accumulation  # 2 layers, top-2 of every token of the step
        assert_updated(biases[step + 1], biases[step], step_counts, RATE)


def test_two_optimizers_on_one_model_update_once():
    model = tiny_lossfree(router_bias_update_rate=RATE)
    params = list(model.parameters())
    optimizers = [torch.optim.SGD(params[: len(params) // 2], lr=1e-2), hf_signopt.Lion(params[len(params) // 2:])]
    counts, biases = plain_loop(model, optimizers, 2)
    for step, step_counts in enumerate(counts):
        assert_updated(biases[step + 1], biases[step], step_counts, RATE)


def test_an_optimizer_of_other_parameters_does_not_update():
    model = tiny_lossfree(router_bias_update_rate=RATE)
    other = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([other], lr=1e-2)
    model(**batch(0)).loss.backward()
    other.grad = torch.ones(3)
    optimizer.step()
    assert bias_snapshot(model).abs().max() == 0


def test_rate_zero_and_opt_out_leave_the_bias():
    for model in (tiny_lossfree(router_bias_update_rate=0.0), tiny_lossfree(router_bias_update_rate=RATE)):
        hf_signopt.disable_balancing(model)
        assert hf_signopt.attached_balancer(model) is None
        _, biases = plain_loop(model, [torch.optim.SGD(model.parameters(), lr=1e-2)], 2)
        assert biases[-1].abs().max() == 0


def test_a_hand_made_balancer_replaces_the_automatic_one():
    model = tiny_lossfree(router_bias_update_rate=RATE)
    automatic = hf_signopt.attached_balancer(model)
    assert automatic.follow_optimizer
    balancer = LossFreeBalancer(model)
    assert not automatic.attached and hf_signopt.attached_balancer(model) is balancer
    _, biases = plain_loop(model, [torch.optim.SGD(model.parameters(), lr=1e-2)], 1)
    assert biases[-1].abs().max() == 0  # the hand-made balancer moves the bias when its step() is called
    balancer.step()
    assert bias_snapshot(model).abs().max() > 0


@pytest.mark.e2e
@pytest.mark.parametrize("with_callback", [False, True], ids=["no_callback", "callback_too"])
def test_trainer_balances_and_reports_without_a_callback(tmp_path, with_callback):
    """Exactly one update per step whether or not the user also adds the callback; metrics either way."""
    model = tiny_lossfree(router_bias_update_rate=RATE)
    recorder = RoutingRecorder(model, 8)
    callbacks = [LossFreeBalanceCallback(), recorder] if with_callback else [recorder]
    args = training_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, logging_steps=2, eval_strategy="steps",
                         eval_steps=3)
    trainer = Trainer(model=model, args=args, train_dataset=token_dataset(16), eval_dataset=token_dataset(4, seed=2),
                      callbacks=callbacks)
    trainer.train()
    for step, counts in enumerate(recorder.step_counts):
        assert_updated(recorder.step_biases[step + 1], recorder.step_biases[step], counts, RATE)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    expected = [maxvio(c).mean().item() for c in recorder.step_counts]
    assert logs[0]["moe/maxvio"] == pytest.approx(sum(expected[:2]) / 2, rel=1e-6)
    summary = trainer.state.log_history[-1]
    assert summary["moe/maxvio"] == pytest.approx(expected[2], rel=1e-6)  # the step after the last log
    evaluation = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
    assert evaluation["eval_moe/maxvio_global"] == pytest.approx(maxvio(recorder.eval_counts).mean().item(), rel=1e-6)


@pytest.mark.e2e
def test_trainer_steps_the_balancer_when_the_optimizer_step_cannot(tmp_path):
    """As under DeepSpeed, whose optimizer steps flat copies of the parameters: the callback makes the update."""

    class FlatCopyTrainer(Trainer):
        def create_optimizer(self, model=None):
            copies = [torch.nn.Parameter(p.detach().clone()) for p in self.model.parameters()]
            self.optimizer = torch.optim.SGD(copies, lr=1e-2)
            return self.optimizer

    model = tiny_lossfree(router_bias_update_rate=RATE)
    recorder = RoutingRecorder(model, 8)
    trainer = FlatCopyTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=token_dataset(8),
                              callbacks=[recorder])
    trainer.train()
    for step, counts in enumerate(recorder.step_counts):
        assert_updated(recorder.step_biases[step + 1], recorder.step_biases[step], counts, RATE)


def deepseek_v3():
    config = DeepseekV3Config(
        vocab_size=48, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=2, first_k_dense_replace=1, kv_lora_rank=8,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(config)


@pytest.mark.e2e
def test_native_bias_family_warns_unless_enabled(tmp_path, caplog):
    model = deepseek_v3()
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=token_dataset(8))
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "nothing balances it" in caplog.text
    assert bias_snapshot(model).abs().max() == 0

    hf_signopt.enable_balancing(model, update_rate=RATE)
    recorder = RoutingRecorder(model, 8)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=token_dataset(8),
                      callbacks=[recorder])
    trainer.train()
    assert len(routers(model)) == 1
    for step, counts in enumerate(recorder.step_counts):
        assert_updated(recorder.step_biases[step + 1], recorder.step_biases[step], counts, RATE)
    assert any("moe/maxvio" in entry for entry in trainer.state.log_history)
