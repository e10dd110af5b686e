"""LossFreeMoe models: Auto classes, save/load of the bias, float32 bias under any dtype, Mixtral checkpoints."""

import json
import logging

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    MixtralConfig,
    MixtralForCausalLM,
    MixtralModel,
)
from transformers.utils import logging as hf_logging

from hf_signopt import (
    LossFreeMoeConfig,
    LossFreeMoeForCausalLM,
    LossFreeMoeForQuestionAnswering,
    LossFreeMoeForSequenceClassification,
    LossFreeMoeForTokenClassification,
    LossFreeMoeModel,
    LossFreeMoeTopKRouter,
    attached_balancer,
)
from hf_signopt.moe.modeling_lossfree_moe import LossFreeMoeDecoderLayer, _building_ours
from moe_tiny import TINY_MOE

TINY = {**TINY_MOE, "pad_token_id": 0}
BIAS = "e_score_correction_bias"


def routers(model):
    return [m for m in model.modules() if isinstance(m, LossFreeMoeTopKRouter)]


def biases(model):
    return [r.e_score_correction_bias for r in routers(model)]


def model_with_random_bias(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LossFreeMoeForCausalLM(LossFreeMoeConfig(**{**TINY, **overrides})).eval()
    for router in routers(model):
        # float32 values that bf16/fp16 cannot hold: any cast on the way would show.
        router.e_score_correction_bias.copy_(torch.randn(TINY["num_local_experts"]) * 1e-2 + 1e-3 / 3)
    return model


@pytest.fixture
def transformers_logs(caplog):
    """Lets caplog see transformers' own log records (its library logger does not propagate by default)."""
    hf_logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield caplog
    hf_logging.disable_propagation()


def test_bias_is_a_persistent_float32_buffer_not_a_parameter():
    model = model_with_random_bias()
    names = [name for name, _ in model.named_buffers() if name.endswith(BIAS)]
    assert names == [f"model.layers.{i}.mlp.gate.{BIAS}" for i in range(TINY["num_hidden_layers"])]
    assert all(name in model.state_dict() for name in names)
    assert not any(name.endswith(BIAS) for name, _ in model.named_parameters())
    assert all(b.dtype == torch.float32 and b.shape == (4,) and not b.requires_grad for b in biases(model))


def test_fresh_model_starts_with_zero_bias():
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY))
    assert all(torch.equal(b, torch.zeros(4)) for b in biases(model))


CASTS = {
    "to_bf16": (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    "to_fp16_kwarg": (lambda m: m.to(dtype=torch.float16), torch.float16),
    "half": (lambda m: m.half(), torch.float16),
    "bfloat16": (lambda m: m.bfloat16(), torch.bfloat16),
}


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_bias_stays_float32_when_the_model_is_cast(cast):
    model = model_with_random_bias()
    before = [b.clone() for b in biases(model)]
    cast_fn, low = CASTS[cast]
    model = cast_fn(model)
    assert model.lm_head.weight.dtype == low and model.model.layers[0].mlp.gate.weight.dtype == low
    for old, new in zip(before, biases(model)):
        assert new.dtype == torch.float32 and torch.equal(old, new)
    out = model(torch.randint(1, 64, (2, 6))).logits
    assert out.dtype == low and torch.isfinite(out).all()
    model.float()
    assert all(torch.equal(old, new) for old, new in zip(before, biases(model)))


def test_bias_is_float32_in_a_model_built_in_bf16():
    model = AutoModelForCausalLM.from_config(LossFreeMoeConfig(**TINY), dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert all(b.dtype == torch.float32 and torch.equal(b, torch.zeros(4)) for b in biases(model))


def test_save_pretrained_round_trips_the_bias_exactly(tmp_path, transformers_logs):
    model = model_with_random_bias()
    ids = torch.randint(1, 64, (2, 7))
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lossfree_moe" and config["architectures"] == ["LossFreeMoeForCausalLM"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        saved = sorted(k for k in f.keys() if k.endswith(BIAS))
        assert len(saved) == TINY["num_hidden_layers"]
        for key, bias in zip(saved, biases(model)):
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.float32 and torch.equal(tensor, bias)

    transformers_logs.clear()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LossFreeMoeForCausalLM
    assert all(torch.equal(a, b) for a, b in zip(biases(model), biases(loaded)))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert "router bias" not in transformers_logs.text and "MISSING" not in transformers_logs.text

    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is LossFreeMoeModel
    assert all(torch.equal(a, b) for a, b in zip(biases(model), biases(base)))


def test_from_pretrained_in_bf16_keeps_the_bias_float32(tmp_path):
    model = model_with_random_bias()
    model.save_pretrained(tmp_path)
    loaded = LossFreeMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.lm_head.weight.dtype == torch.bfloat16
    for saved, bias in zip(biases(model), biases(loaded)):
        assert bias.dtype == torch.float32 and torch.equal(saved, bias)


@pytest.fixture
def mixtral_dir(tmp_path):
    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(MixtralConfig(**TINY)).eval()
    path = tmp_path / "mixtral"
    mixtral.save_pretrained(path)
    return mixtral, path


def test_mixtral_checkpoint_loads_with_zero_bias_and_same_outputs(mixtral_dir, transformers_logs, tmp_path):
    mixtral, path = mixtral_dir
    transformers_logs.clear()
    model = LossFreeMoeForCausalLM.from_pretrained(path).eval()
    log = transformers_logs.text
    assert f"no router bias (`{BIAS}`) for 2 of 2 layers" in log and "start at zero" in log
    assert "MISSING" not in log and "UNEXPECTED" not in log  # every Mixtral weight found its place
    assert all(torch.equal(b, torch.zeros(4)) for b in biases(model))

    ids = torch.randint(1, 64, (3, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, mixtral(ids).logits)
    ours = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
    theirs = mixtral.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert ours.shape == (1, 15) and torch.equal(ours, theirs)

    # Saving converts the checkpoint: it comes back through the Auto classes as lossfree_moe, bias included.
    model.save_pretrained(tmp_path / "converted")
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["model_type"] == "lossfree_moe"
    transformers_logs.clear()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted")
    assert type(reloaded) is LossFreeMoeForCausalLM and "router bias" not in transformers_logs.text


def test_generate_works_with_a_nonzero_bias():
    model = model_with_random_bias(seed=3)
    for router in routers(model):
        router.e_score_correction_bias.copy_(torch.tensor([1.0, 1.0, 0.0, 0.0]))  # always experts 0 and 1
    out = model.generate(torch.randint(1, 64, (2, 5)), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)


@pytest.mark.parametrize(
    ("auto_class", "model_class", "output", "shape"),
    [
        (AutoModelForSequenceClassification, LossFreeMoeForSequenceClassification, "logits", (2, 3)),
        (AutoModelForTokenClassification, LossFreeMoeForTokenClassification, "logits", (2, 6, 3)),
        (AutoModelForQuestionAnswering, LossFreeMoeForQuestionAnswering, "start_logits", (2, 6)),
    ],
)
def test_task_heads_resolve_and_run(auto_class, model_class, output, shape):
    torch.manual_seed(0)
    model = auto_class.from_config(LossFreeMoeConfig(**TINY, num_labels=3))
    assert type(model) is model_class and len(routers(model)) == TINY["num_hidden_layers"]
    result = getattr(model(torch.randint(1, 64, (2, 6))), output)
    assert result.shape == shape


def test_mixtral_experts_implementation_dispatch_is_kept():
    model = model_with_random_bias()
    mixtral = MixtralForCausalLM(MixtralConfig(**TINY))
    assert model.config._experts_implementation == mixtral.config._experts_implementation
    ids = torch.randint(1, 64, (2, 7))
    model.set_experts_implementation("eager")
    with torch.no_grad():
        eager = model(ids).logits
        for implementation in ("batched_mm", "grouped_mm"):
            model.set_experts_implementation(implementation)
            assert model.config._experts_implementation == implementation
            torch.testing.assert_close(model(ids).logits, eager)


def test_lossfree_checkpoint_with_zero_bias_loads_into_mixtral(tmp_path):
    torch.manual_seed(0)
    model = LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY)).eval()
    model.save_pretrained(tmp_path)
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(mixtral(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    ("ours", "theirs"), [(LossFreeMoeForCausalLM, MixtralForCausalLM), (LossFreeMoeModel, MixtralModel)]
)
@pytest.mark.parametrize("rate", [0.0, 1e-3])  # with and without the balancer attached at construction
def test_same_seed_builds_mixtral_weights_and_structure(ours, theirs, rate):
    torch.manual_seed(7)
    mixtral = theirs(MixtralConfig(**TINY)).eval()
    after_mixtral = torch.random.get_rng_state()
    torch.manual_seed(7)
    model = ours(LossFreeMoeConfig(**TINY, router_bias_update_rate=rate)).eval()
    assert torch.equal(torch.random.get_rng_state(), after_mixtral)  # construction draws the same random numbers

    expected = mixtral.state_dict()
    weights = model.state_dict()
    assert sorted(set(weights) - set(expected)) == [
        f"{'model.' if ours is LossFreeMoeForCausalLM else ''}layers.{i}.mlp.gate.{BIAS}"
        for i in range(TINY["num_hidden_layers"])
    ]
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())
    assert all(torch.equal(b, torch.zeros(4)) for b in biases(model))
    # Same modules in the same order, each Mixtral's class or our subclass of it.
    pairs = list(zip(model.named_modules(), mixtral.named_modules(), strict=True))
    assert all(name == other and isinstance(module, type(mod)) for (name, module), (other, mod) in pairs)
    assert [type(layer) for layer in model.base_model.layers] == [LossFreeMoeDecoderLayer] * TINY["num_hidden_layers"]
    assert model._no_split_modules == {"LossFreeMoeDecoderLayer"}
    assert model._keep_in_fp32_modules_strict == {BIAS}
    assert model.base_model.gradient_checkpointing is False
    assert (attached_balancer(model) is not None) == (rate > 0)

    ids = torch.randint(1, 64, (2, 9))
    with torch.no_grad():
        ours_out, theirs_out = model(ids), mixtral(ids)
    name = "logits" if ours is LossFreeMoeForCausalLM else "last_hidden_state"
    assert torch.equal(ours_out[name], theirs_out[name])


def test_a_mixtral_constructor_that_does_not_build_the_class_is_refused():
    with pytest.raises(TypeError, match=r"MixtralModel.__init__ does not build \['MixtralTopKRouter'\]"):
        _building_ours(MixtralModel.__init__, MixtralTopKRouter=LossFreeMoeTopKRouter)
