"""PEFT on loss-free MoE models: adapters carry the trained router biases, `modules_to_save` routers count once."""

import math
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_moe_callback import VOCAB, assert_updated, maxvio, tiny_lossfree, token_dataset, training_args
from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainerCallback

from hf_signopt import LossFreeMoeForCausalLM, attached_balancer, enable_balancing
from hf_signopt.integrations.peft_router_bias import register_peft_router_bias
from hf_signopt.moe.balancer import find_routers

peft = pytest.importorskip("peft")
LoraConfig, PeftModel, get_peft_model = peft.LoraConfig, peft.PeftModel, peft.get_peft_model

pytestmark = pytest.mark.e2e

BIAS = "e_score_correction_bias"
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
ROUTER_BIAS_KEYS = {f"base_model.model.model.layers.{i}.mlp.gate.{BIAS}" for i in range(2)}  # as PEFT saves them


def biases(model):
    return torch.stack([getattr(router, BIAS).detach().clone() for _, router in find_routers(model)])


def logits(model, seed=5):
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapter_keys(path):
    return set(load_file(str(path / "adapter_model.safetensors")))


class StepCounts(TrainerCallback):
    """Counts the top-k choices of the given routers on its own and, before each optimizer step, takes the
    balancer's counts of that step; snapshots the routers' biases after each step."""

    def __init__(self, model, routers, num_experts):
        self.model, self.routers = model, routers
        self.counts = torch.zeros(len(routers), num_experts, dtype=torch.int64)
        self.steps, self.biases = [], [self._biases()]
        for layer, router in enumerate(routers):
            router.register_forward_hook(self._hook(layer))

    def _biases(self):
        return torch.stack([getattr(router, BIAS).detach().clone() for router in self.routers])

    def _hook(self, layer):
        def record(module, args, output):
            if module.training and torch.is_grad_enabled():
                self.counts[layer] += torch.bincount(output[2].reshape(-1), minlength=self.counts.shape[1])

        return record

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append((self.counts.clone(), attached_balancer(self.model).tokens_per_expert))
        self.counts.zero_()

    def on_step_end(self, args, state, control, **kwargs):
        self.biases.append(self._biases())


def test_registration_wraps_every_place_peft_saves_from():
    assert "peft" in sys.modules  # imported after hf_signopt: wrapped when it was imported
    assert register_peft_router_bias() and register_peft_router_bias()  # idempotent once imported
    wrapped = peft.utils.save_and_load.get_peft_model_state_dict
    assert wrapped.adds_router_biases and not hasattr(wrapped.__wrapped__, "adds_router_biases")
    assert peft.get_peft_model_state_dict is wrapped and peft.peft_model.get_peft_model_state_dict is wrapped


def test_lora_adapter_carries_the_trained_biases(tmp_path):
    model = tiny_lossfree()
    model.save_pretrained(tmp_path / "base")
    initial = biases(model)
    peft_model = get_peft_model(model, LoraConfig(**LORA))
    Trainer(model=peft_model, args=training_args(tmp_path / "run", optim="simba"),
            train_dataset=token_dataset(24)).train()
    trained = biases(peft_model)
    assert not torch.equal(trained, initial)  # the balancer moved them while LoRA trained
    peft_model.save_pretrained(tmp_path / "adapter")
    assert ROUTER_BIAS_KEYS <= adapter_keys(tmp_path / "adapter")

    base = LossFreeMoeForCausalLM.from_pretrained(tmp_path / "base")
    assert torch.equal(biases(base), initial)
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(biases(reloaded), trained)
    assert torch.equal(logits(reloaded), logits(peft_model))


def test_resumed_lora_run_restores_the_biases(tmp_path):
    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    def run(path, callbacks, resume=None):
        peft_model = get_peft_model(tiny_lossfree(router_bias_update_rate=0.05), LoraConfig(**LORA))
        args = training_args(path, max_steps=4, save_strategy="steps", save_steps=2, optim="simba")
        Trainer(model=peft_model, args=args, train_dataset=token_dataset(16),
                callbacks=callbacks).train(resume_from_checkpoint=resume)
        return peft_model

    full = run(tmp_path / "full", [])
    run(tmp_path / "interrupted", [StopAt()])
    resumed = run(tmp_path / "interrupted", [], resume=str(tmp_path / "interrupted" / "checkpoint-2"))
    assert biases(full).abs().max() > 0
    assert torch.equal(biases(resumed), biases(full))


@pytest.mark.parametrize("enable", [False, True], ids=["own_balancer", "enable_balancing"])
def test_modules_to_save_router_is_found_and_counted_once(tmp_path, enable):
    """The model's own balancer follows routing to PEFT's copies; `enable_balancing(peft_model)` replaces it."""
    model = tiny_lossfree()
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(**LORA, modules_to_save=["gate"]))
    names = [name for name, _ in find_routers(peft_model)]
    assert names == [f"base_model.model.model.layers.{i}.mlp.gate.modules_to_save.default" for i in range(2)]
    with peft_model.disable_adapter():  # the wrapper then runs the original router
        assert [name for name, _ in find_routers(peft_model)] == [n.replace("modules_to_save.default",
                                                                            "original_module") for n in names]

    own = attached_balancer(peft_model)
    assert own is not None and own.follow_optimizer  # found through the hook PEFT copied with each router
    if enable:
        balancer = enable_balancing(peft_model)
        assert len(balancer.router_names) == 2 and not own.attached
    copies = [layer.mlp.gate.modules_to_save["default"] for layer in peft_model.base_model.model.model.layers]
    recorder = StepCounts(peft_model, copies, 8)
    trainer = Trainer(model=peft_model, args=training_args(tmp_path / "run", optim="simba"),
                      train_dataset=token_dataset(24), callbacks=[recorder])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(recorder.steps) == len(logs) == 3
    for step, ((counted, balanced), entry) in enumerate(zip(recorder.steps, logs)):
        assert counted.sum().item() == 2 * 2 * 12 * 2  # layers * batch * length * top_k: each token once
        assert torch.equal(balanced, counted)
        assert_updated(recorder.biases[step + 1], recorder.biases[step], counted)
        assert math.isfinite(entry["moe/maxvio"]) and math.isfinite(entry["moe/maxvio_max"])
        assert entry["moe/maxvio"] == pytest.approx(maxvio(counted).mean().item(), rel=1e-5)

    # PEFT saves the routing copy, bias included, under the router's own name; nothing is added twice.
    peft_model.save_pretrained(tmp_path / "adapter")
    assert {key for key in adapter_keys(tmp_path / "adapter") if key.endswith(BIAS)} == ROUTER_BIAS_KEYS
    base = LossFreeMoeForCausalLM.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.equal(biases(reloaded), recorder.biases[-1])
    assert torch.equal(logits(reloaded), logits(peft_model))


def test_adapter_of_a_model_without_routers_is_untouched(tmp_path):
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(MixtralForCausalLM.from_pretrained(tmp_path / "base"), LoraConfig(**LORA))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()  # a non-trivial adapter
    plain = peft.utils.save_and_load.get_peft_model_state_dict.__wrapped__(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert adapter_keys(tmp_path / "adapter") == set(plain)
    reloaded = PeftModel.from_pretrained(MixtralForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert torch.equal(logits(reloaded), logits(peft_model))
