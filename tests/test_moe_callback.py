"""LossFreeBalanceCallback inside transformers.Trainer: update cadence, evaluation, logging, resume, misuse."""

import pytest
import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_signopt import LossFreeBalanceCallback, LossFreeMoeConfig, LossFreeMoeForCausalLM

pytestmark = pytest.mark.e2e

VOCAB = 48


def tiny_lossfree(**overrides):
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=64,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return LossFreeMoeForCausalLM(LossFreeMoeConfig(**fields))


def token_dataset(n, length=12, seed=1):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(path, **overrides):
    fields = dict(
        output_dir=str(path), per_device_train_batch_size=2, per_device_eval_batch_size=4, learning_rate=1e-2,
        max_steps=3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=7, data_seed=7,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


def routers(model):
    return [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]


def bias_snapshot(model):
    return torch.stack([r.e_score_correction_bias.detach().clone() for r in routers(model)])


class RoutingRecorder(TrainerCallback):
    """Counts the routers' top-k choices on its own and snapshots the biases around every (micro-)step."""

    def __init__(self, model, num_experts):
        self.model = model
        self.train_counts = torch.zeros(len(routers(model)), num_experts, dtype=torch.int64)
        self.eval_counts = torch.zeros_like(self.train_counts)
        self.step_counts, self.step_biases, self.substep_biases = [], [], []
        for layer, router in enumerate(routers(model)):
            router.register_forward_hook(self._hook(layer))

    def _hook(self, layer):
        def record(module, args, output):
            chosen = torch.bincount(output[2].reshape(-1), minlength=self.train_counts.shape[1])
            if not module.training:
                self.eval_counts[layer] += chosen
            elif torch.is_grad_enabled():
                self.train_counts[layer] += chosen

        return record

    def on_train_begin(self, args, state, control, **kwargs):
        self.step_biases.append(bias_snapshot(self.model))

    def on_substep_end(self, args, state, control, **kwargs):
        self.substep_biases.append((len(self.step_counts), bias_snapshot(self.model)))

    def on_step_end(self, args, state, control, **kwargs):
        self.step_counts.append(self.train_counts.clone())
        self.step_biases.append(bias_snapshot(self.model))
        self.train_counts.zero_()


def assert_updated(after, before, counts, rate=0.005, rule="linear"):
    """`after` is `before` moved once by the rule, written out from the loads: `"sign"`: `u * sign(mean - load)`
    (bitwise: the step is +-u or 0); `"linear"` (the default rule and rate): `u * (mean - load) / mean` (to a few
    float32 ulps of biases below 1: the library computes the same quotient in another order)."""
    mean = counts.sum(dim=1, keepdim=True).double() / counts.shape[1]
    if rule == "sign":
        assert torch.equal(after, before + torch.sign(mean - counts.double()).float() * torch.tensor(rate))
    else:
        step = torch.where(mean > 0, (mean - counts.double()) / mean, 0.0)
        torch.testing.assert_close(after, before + (rate * step).float(), rtol=0, atol=5e-7)
    assert not torch.equal(after, before)


def maxvio(counts):
    mean = counts.sum(dim=1).double() / counts.shape[1]
    return (counts.max(dim=1).values.double() - mean) / mean


def test_one_update_per_optimizer_step_with_gradient_accumulation(tmp_path):
    model = tiny_lossfree()
    recorder = RoutingRecorder(model, 8)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, gradient_accumulation_steps=4),
        train_dataset=token_dataset(24),
        callbacks=[LossFreeBalanceCallback(), recorder],
    )
    trainer.train()
    assert len(recorder.step_counts) == 3
    assert len(recorder.substep_biases) == 3 * 3  # micro-batches that do not end an optimizer step
    for step, counts in enumerate(recorder.step_counts):
        assert counts.sum().item() == 2 * 4 * 2 * 12 * 2  # layers * micro-batches * batch * length * top_k
        assert_updated(recorder.step_biases[step + 1], recorder.step_biases[step], counts)
    for step, bias in recorder.substep_biases:
        assert torch.equal(bias, recorder.step_biases[step])  # unchanged within the step
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry, counts in zip(logs, recorder.step_counts):
        per_layer = maxvio(counts)
        assert entry["moe/maxvio"] == pytest.approx(per_layer.mean().item(), rel=1e-5)
        assert entry["moe/maxvio_max"] == pytest.approx(per_layer.max().item(), rel=1e-5)


def test_steps_after_the_last_log_are_reported_with_the_training_summary(tmp_path):
    model = tiny_lossfree()
    recorder = RoutingRecorder(model, 8)
    # 5 steps, a log every 2: steps 1-2 and 3-4 in the training logs, step 5 with the final summary.
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=5, logging_steps=2),
                      train_dataset=token_dataset(24), callbacks=[LossFreeBalanceCallback(), recorder])
    trainer.train()
    history = trainer.state.log_history
    logged = [entry for entry in history if "loss" in entry]
    groups = [recorder.step_counts[0:2], recorder.step_counts[2:4]]
    for entry, steps in zip(logged, groups, strict=True):
        per_layer = torch.stack([maxvio(counts) for counts in steps]).mean(dim=0)
        assert entry["moe/maxvio"] == pytest.approx(per_layer.mean().item(), rel=1e-5)
    summary = history[-1]
    assert "train_runtime" in summary and summary["step"] == 5
    last = maxvio(recorder.step_counts[4])
    assert summary["moe/maxvio"] == pytest.approx(last.mean().item(), rel=1e-5)
    assert summary["moe/maxvio_max"] == pytest.approx(last.max().item(), rel=1e-5)


def test_a_router_that_sees_no_token_is_left_out_of_finite_metrics(tmp_path):
    model = tiny_lossfree()
    # The second layer's experts never run (as a vision MoE's fed text only): its router sees no token.
    model.model.layers[1].mlp.forward = torch.zeros_like
    recorder = RoutingRecorder(model, 8)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=token_dataset(24),
                      eval_dataset=token_dataset(8, seed=2), callbacks=[LossFreeBalanceCallback(), recorder])
    trainer.train()
    metrics = trainer.evaluate()
    for entry, counts in zip([e for e in trainer.state.log_history if "loss" in e], recorder.step_counts):
        assert entry["moe/maxvio"] == pytest.approx(maxvio(counts[:1]).item(), rel=1e-5)  # the first layer alone
        assert entry["moe/maxvio_max"] == entry["moe/maxvio"]
    assert metrics["eval_moe/maxvio_global"] == pytest.approx(maxvio(recorder.eval_counts[:1]).item(), rel=1e-5)


def test_evaluation_reports_maxvio_global_and_leaves_the_bias(tmp_path):
    model = tiny_lossfree()
    recorder = RoutingRecorder(model, 8)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2),
        train_dataset=token_dataset(8),
        eval_dataset=token_dataset(10, seed=2),
        callbacks=[LossFreeBalanceCallback(), recorder],
    )
    trainer.train()
    before = bias_snapshot(model)
    recorder.eval_counts.zero_()
    metrics = trainer.evaluate()
    assert torch.equal(bias_snapshot(model), before)
    assert recorder.eval_counts.sum().item() == 2 * 10 * 12 * 2
    per_layer = maxvio(recorder.eval_counts)
    assert metrics["eval_moe/maxvio_global"] == pytest.approx(per_layer.mean().item(), rel=1e-5)
    assert metrics["eval_moe/maxvio_global_max"] == pytest.approx(per_layer.max().item(), rel=1e-5)
    assert trainer.state.log_history[-1]["eval_moe/maxvio_global"] == metrics["eval_moe/maxvio_global"]
    trainer.predict(token_dataset(4, seed=3))
    assert torch.equal(bias_snapshot(model), before)


def test_gradient_checkpointing_gives_the_same_counts(tmp_path):
    runs = []
    for checkpointing in (False, True):
        model = tiny_lossfree(router_bias_update_rate=0.05)
        recorder = RoutingRecorder(model, 8)
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path / str(checkpointing), gradient_accumulation_steps=2,
                               activation_checkpointing=checkpointing),
            train_dataset=token_dataset(12),
            callbacks=[LossFreeBalanceCallback(), recorder],
        )
        trainer.train()
        runs.append((recorder, [e["moe/maxvio"] for e in trainer.state.log_history if "loss" in e]))
    (plain, plain_log), (checkpointed, checkpointed_log) = runs
    assert checkpointed_log == plain_log
    # the recorder counts recomputations too, so its totals double; the balancer's biases must not notice
    for plain_counts, recomputed in zip(plain.step_counts, checkpointed.step_counts):
        assert torch.equal(recomputed, 2 * plain_counts)
    assert torch.equal(checkpointed.step_biases[-1], plain.step_biases[-1])


def test_resumed_run_ends_like_the_uninterrupted_one(tmp_path):
    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    def run(path, callbacks, resume=None):
        model = tiny_lossfree(router_bias_update_rate=0.05)  # the same fresh weights: the checkpoint must replace them
        args = training_args(path, max_steps=6, gradient_accumulation_steps=2, save_strategy="steps", save_steps=3)
        trainer = Trainer(model=model, args=args, train_dataset=token_dataset(40),
                          callbacks=[LossFreeBalanceCallback(), *callbacks])
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full", [])
    run(tmp_path / "interrupted", [StopAt()])
    resumed = run(tmp_path / "interrupted", [], resume=str(tmp_path / "interrupted" / "checkpoint-3"))
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    assert any(name.endswith("e_score_correction_bias") for name in full_state)
    assert bias_snapshot(full).abs().max() > 0
    for name, tensor in full_state.items():
        assert torch.equal(tensor, resumed_state[name]), name


def test_deepseek_v3_bias_is_balanced(tmp_path):
    config = DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=2, first_k_dense_replace=1, kv_lora_rank=8,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config)
    recorder = RoutingRecorder(model, 8)
    trainer = Trainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=token_dataset(8),
                      callbacks=[LossFreeBalanceCallback(), recorder])
    trainer.train()
    assert len(routers(model)) == 1  # the first layer is dense
    for step, counts in enumerate(recorder.step_counts):
        assert_updated(recorder.step_biases[step + 1], recorder.step_biases[step], counts)
    assert bias_snapshot(model).abs().max() > 0


def test_model_without_routers_is_refused_at_train_begin(tmp_path):
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    trainer = Trainer(model=MixtralForCausalLM(config), args=training_args(tmp_path),
                      train_dataset=token_dataset(8), callbacks=[LossFreeBalanceCallback()])
    with pytest.raises(ValueError, match="MixtralForCausalLM has no MoE router with an `e_score_correction_bias`"):
        trainer.train()


def test_bad_callback_arguments():
    with pytest.raises(ValueError, match=r"update_rate must be a finite number >= 0, got -1"):
        LossFreeBalanceCallback(update_rate=-1)
    with pytest.raises(ValueError, match=r"update_rule must be one of .* got 'SIGN'"):
        LossFreeBalanceCallback(update_rule="SIGN")


def test_a_second_trainer_on_the_same_model_takes_over(tmp_path):
    model = tiny_lossfree()
    first = LossFreeBalanceCallback()
    Trainer(model=model, args=training_args(tmp_path / "a"), train_dataset=token_dataset(8), callbacks=[first])
    second = LossFreeBalanceCallback()
    trainer = Trainer(model=model, args=training_args(tmp_path / "b", max_steps=1), train_dataset=token_dataset(8),
                      callbacks=[second])
    trainer.train()
    assert first.balancer.tokens_per_expert.sum() == 0  # detached: the first callback no longer counts
    assert bias_snapshot(model).abs().max() > 0
