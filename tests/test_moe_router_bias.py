"""`add_router_bias`: a selection-only router bias for the MoE families of the installed transformers.

The families table (`benchmarks/moe_families.py`) is checked against the lists below, so that a transformers
upgrade that changes a family's router fails here. `HF_SIGNOPT_MOE_FAMILIES_TABLE=path` writes the table as
markdown to `path`.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from moe_tiny import TINY_MOE
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from benchmarks.moe_families import first_output, markdown, model_inputs, moe_families, survey, tiny_model
from hf_signopt import LossFreeBalancer, LossFreeMoeConfig, LossFreeMoeForCausalLM, add_router_bias
from hf_signopt.moe.balancer import BIAS_NAME
from hf_signopt.moe.router_bias import CONFIG_FLAG, RouterBiasMixin, moe_routers

# add_router_bias converts these; with the zero bias their outputs are bitwise the unconverted model's.
CONVERTED = {
    "aria_text", "cohere2_moe", "deepseek_v2", "flex_olmo", "flint", "gemma4_text", "gpt_oss", "granitemoe",
    "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "jamba", "lara_mini", "mellum",
    "minimax", "mixtral", "olmoe", "openai_privacy_filter", "qwen2_moe", "qwen3_5_moe", "qwen3_moe", "qwen3_next",
    "qwen3_vl_moe_text", "qwen4_exp",
}  # fmt: skip
# These already carry an `e_score_correction_bias`: add_router_bias returns them unchanged.
NATIVE = {
    "axk1", "axk2", "bailing_hybrid", "beam", "deepseek_v3", "deepseek_v32", "deepseek_v4", "dots1", "dots3_note",
    "ernie4_5_moe", "exaone_moe", "glm4_moe", "glm4_moe_lite", "glm4v_moe_text", "glm5_next_text", "glm_moe_dsa",
    "hy_v3", "hy_v4", "hy_v4_vl_text", "inkling2_loop_text", "inkling2_text", "inkling_text", "kimi_linear",
    "kolibri1", "laguna", "longcat_flash", "mimo_v2_flash", "minimax_m2", "minimax_m3_vl_text", "muse_spark_text",
    "nemotron_h", "solar_open",
}  # fmt: skip
# add_router_bias raises ValueError naming the router class.
UNSUPPORTED = {
    "afmoe": "AfmoeTokenChoiceRouter",  # forward(hidden_states, expert_bias): balanced with its own bias
    "dbrx": "DbrxRouter",  # returns the logits only
    "lfm2_moe": "Lfm2MoeTopKRouter",  # forward(hidden_states, expert_bias): balanced with its own bias
    "llama4": "Llama4Router",  # returns (scores, logits)
    "mistral4": "Mistral4TopkRouter",  # group-limited top-k (3 top-k calls)
    "mistral_large4_text": "MistralLarge4TextTopkRouter",  # group-limited top-k
    "nllb-moe": "NllbMoeTop2Router",  # argmax with expert capacity
    "phimoe": "PhimoeTopKRouter",  # sparsemixer
    "switch_transformers": "SwitchTransformersTop1Router",  # argmax with expert capacity
    "zaya": "ZayaRouter",  # forward(hidden_states, router_states), own balancing biases
}


@pytest.fixture(autouse=True)
def tiny_model_setup():
    """One thread (the models are tiny, and a busy machine makes more threads much slower) and no advisory
    warnings from the tiny configs."""
    verbosity, threads = hf_logging.get_verbosity(), torch.get_num_threads()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    yield
    hf_logging.set_verbosity(verbosity)
    torch.set_num_threads(threads)


def tiny(model_type: str) -> nn.Module:
    return tiny_model(model_type, moe_families()[model_type])


def biases(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buffer for name, buffer in model.named_buffers() if name.endswith(BIAS_NAME)}


def set_random_biases(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bias in biases(model).values():
            bias.copy_(torch.randn(bias.shape, generator=generator) * 0.3)


def test_families_table():
    """Every MoE family of the installed transformers is converted, native or unsupported, as listed above; each
    converted one computes bitwise the unconverted model's logits (or last hidden state) at zero bias."""
    rows = survey()
    if os.environ.get("HF_SIGNOPT_MOE_FAMILIES_TABLE"):
        with open(os.environ["HF_SIGNOPT_MOE_FAMILIES_TABLE"], "w") as file:
            file.write(markdown(rows) + "\n")
    status = {row.family: row for row in rows}
    assert not [row for row in rows if row.status == "failed"]
    assert {family for family, row in status.items() if row.status == "converted"} == CONVERTED
    assert {family for family, row in status.items() if row.status == "native"} == NATIVE
    unsupported = {family: row.routers for family, row in status.items() if row.status == "unsupported"}
    assert unsupported == UNSUPPORTED


@pytest.mark.parametrize("model_type", sorted(CONVERTED))
def test_bias_chooses_experts_weights_stay_unbiased(model_type):
    """A large bias on experts {1, 2} makes every token choose them; a token that chose them anyway keeps its
    weights, and the router logits never change."""
    model = tiny(model_type)
    add_router_bias(model)
    _, router = moe_routers(model)[0]
    family_forward = type(router).__bases__[1].forward  # the unconverted class: (RouterBiasMixin, family class)
    weight = next(p for p in router.parameters() if p.dim() == 2)
    hidden = torch.randn(64, weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, weights, index = family_forward(router, hidden)
        router.e_score_correction_bias[[1, 2]] = 1e4
        biased_logits, biased_weights, biased_index = router(hidden)
    assert torch.equal(biased_logits, logits)
    assert (biased_index.sort(dim=-1).values == torch.tensor([1, 2])).all()
    kept = (index.sort(dim=-1).values == torch.tensor([1, 2])).all(dim=-1)
    assert kept.any()

    def by_expert(w, i):
        return w.gather(-1, i.argsort(dim=-1))

    assert torch.equal(by_expert(biased_weights, biased_index)[kept], by_expert(weights, index)[kept])


def reference_routing(model_type: str, router: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate weights and chosen experts written out from each family's router code, with the bias added to
    what the family ranks (probabilities for Mixtral / Qwen2-MoE / Jamba, logits for GPT-OSS / GraniteMoE)."""
    bias = router.e_score_correction_bias
    if model_type in ("gpt_oss", "granitemoe"):
        logits = F.linear(hidden, router.weight, getattr(router, "bias", None))
        index = torch.topk(logits + bias, router.top_k, dim=-1).indices
        return torch.softmax(logits.gather(-1, index), dim=-1), index
    probs = torch.softmax(F.linear(hidden, router.weight), dim=-1)
    index = torch.topk(probs + bias, router.top_k, dim=-1).indices
    weights = probs.gather(-1, index)
    if model_type == "mixtral" or getattr(router, "norm_topk_prob", False):
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, index


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "jamba", "gpt_oss", "granitemoe"])
def test_weights_are_the_family_gate_of_the_chosen_experts(model_type):
    model = add_router_bias(tiny(model_type))
    _, router = moe_routers(model)[0]
    hidden = torch.randn(64, router.weight.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.2, -0.1, 0.05, 0.0]))
        _, weights, index = router(hidden)
        expected_weights, expected_index = reference_routing(model_type, router, hidden)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(weights, expected_weights.to(weights.dtype))


@pytest.mark.parametrize("model_type", ["gpt_oss", "cohere2_moe"])
def test_zero_bias_is_exact_on_tied_bfloat16_scores(model_type):
    """These families rank bf16 logits, which tie often; the float32 ranking (bf16 scores + zero bias) picks
    the same experts in the same order on CPU."""
    model = add_router_bias(tiny(model_type)).to(torch.bfloat16)
    _, router = moe_routers(model)[0]
    hidden = torch.randn(4096, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        expected, converted = type(router).__bases__[1].forward(router, hidden), router(hidden)
        ranked = expected[0].float().sort(dim=-1, descending=True).values
    assert (ranked[:, 1] == ranked[:, 2]).any()  # ties at the top-2 boundary
    assert all(torch.equal(a, b) for a, b in zip(converted, expected))


def test_converted_router_compiles_fullgraph():
    model = add_router_bias(tiny("mixtral"))
    _, router = moe_routers(model)[0]
    with torch.no_grad():
        router.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
        hidden = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
        compiled = torch.compile(router, backend="eager", fullgraph=True)(hidden)
        assert all(torch.equal(a, b) for a, b in zip(compiled, router(hidden)))


def test_converted_model_pickles(tmp_path):
    model = add_router_bias(tiny("mixtral"))
    set_random_biases(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    inputs = model_inputs(model)
    assert type(loaded.model.layers[0].mlp.gate) is type(model.model.layers[0].mlp.gate)
    assert torch.equal(first_output(loaded, inputs), first_output(model, inputs))


def test_idempotent_and_native_models_unchanged():
    model = add_router_bias(tiny("mixtral"))
    names = list(model.state_dict())
    classes = [type(module) for module in model.modules()]
    assert add_router_bias(model) is model
    assert list(model.state_dict()) == names and [type(module) for module in model.modules()] == classes
    assert len(biases(model)) == model.config.num_hidden_layers

    for native in (LossFreeMoeForCausalLM(LossFreeMoeConfig(**TINY_MOE)), tiny("deepseek_v3")):
        names = list(native.state_dict())
        assert add_router_bias(native) is native
        assert list(native.state_dict()) == names
        assert not getattr(native.config, CONFIG_FLAG, False)
        assert not any(isinstance(module, RouterBiasMixin) for module in native.modules())


def test_no_router_or_unsupported_router_raises_and_converts_nothing():
    dense = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    with pytest.raises(ValueError, match="has no MoE router"):
        add_router_bias(dense)
    phimoe = tiny("phimoe")
    with pytest.raises(ValueError, match="PhimoeTopKRouter: its forward calls torch.topk 0 times"):
        add_router_bias(phimoe)
    assert not biases(phimoe) and not getattr(phimoe.config, CONFIG_FLAG, False)


@pytest.mark.parametrize(
    ("model_type", "config", "problem"),
    [
        ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 2}, "forward calls torch.topk 2 times"),
        ("deepseek_v2", {"topk_method": "greedy"}, None),
        ("lfm2_moe", {"use_expert_bias": True}, r"forward\(hidden_states\) failed"),  # its own expert_bias
        ("lfm2_moe", {"use_expert_bias": False}, None),
    ],
)
def test_the_config_decides_support(model_type, config, problem):
    model = tiny_model(model_type, moe_families()[model_type], **config)
    if problem is None:
        assert getattr(add_router_bias(model).config, CONFIG_FLAG)
    else:
        with pytest.raises(ValueError, match=f"{type(moe_routers(model)[0][1]).__name__}: its {problem}"):
            add_router_bias(model)


class _ToyRouter(nn.Module):
    """Chooses with one top-k in eval mode, with two in training mode (unsupported there)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 8))

    def forward(self, hidden_states):
        logits = F.linear(hidden_states, self.weight)
        if self.training:
            logits.topk(1)
        values, index = logits.topk(2)
        return logits, values.softmax(-1), index


def test_converted_forward_rejects_a_path_that_ignores_the_bias():
    block = nn.Module()
    block.gate, block.experts = _ToyRouter(), nn.Linear(8, 8)
    add_router_bias(block.eval())
    block.gate(torch.randn(3, 8))
    block.train()
    with pytest.raises(RuntimeError, match="calls torch.topk 2 times"):
        block.gate(torch.randn(3, 8))


def test_conversion_leaves_the_global_random_state_alone():
    model = tiny("mixtral")
    state = torch.get_rng_state()
    add_router_bias(model)
    assert torch.equal(torch.get_rng_state(), state)


def test_bias_stays_float32():
    model = add_router_bias(tiny("qwen2_moe"))
    set_random_biases(model)
    before = {name: bias.clone() for name, bias in biases(model).items()}
    for cast in (torch.bfloat16, torch.float16):
        model.to(cast)
        assert all(bias.dtype == torch.float32 and torch.equal(bias, before[name])
                   for name, bias in biases(model).items())
    assert model.model.layers[0].mlp.gate.weight.dtype == torch.float16
    model.to(torch.bfloat16)
    first_output(model, model_inputs(model))  # bf16 scores + float32 bias select in float32


@pytest.mark.parametrize(("model_type", "shard"), [("mixtral", "20KB"), ("gpt_oss", None)])
def test_save_and_reload_restores_the_biases(model_type, shard, tmp_path):
    """Mixtral saves its gates under `block_sparse_moe.` names, in several shards here (an index file)."""
    model = add_router_bias(tiny(model_type))
    set_random_biases(model)
    inputs = model_inputs(model)
    expected = first_output(model, inputs)
    model.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    assert (tmp_path / "model.safetensors.index.json").exists() == bool(shard)
    assert json.loads((tmp_path / "config.json").read_text())[CONFIG_FLAG] is True

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not biases(reloaded)  # transformers drops them as unexpected keys
    add_router_bias(reloaded)
    assert biases(reloaded).keys() == biases(model).keys()
    assert all(torch.equal(bias, biases(model)[name]) for name, bias in biases(reloaded).items())
    assert torch.equal(first_output(reloaded, inputs), expected)

    half = add_router_bias(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16))
    assert all(bias.dtype == torch.float32 and torch.equal(bias, biases(model)[name])
               for name, bias in biases(half).items())


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_balancer_moves_the_bias_and_lowers_maxvio(model_type):
    """Frozen weights, routing skewed toward expert 0 by its bias: a few balancer steps undo the skew."""
    model = add_router_bias(tiny(model_type)).requires_grad_(False).train()
    for bias in biases(model).values():
        bias[0] = 0.2
    balancer = LossFreeBalancer(model, update_rate=0.02)
    assert len(balancer.router_names) == model.config.num_hidden_layers
    inputs = {"input_ids": torch.randint(3, 64, (4, 32), generator=torch.Generator().manual_seed(0))}
    maxvio = []
    for _ in range(12):
        model(**inputs)
        maxvio.append(balancer.step().maxvio.mean().item())
    balancer.remove()
    assert all(bias[0] < 0.2 for bias in biases(model).values())
    assert maxvio[0] > 0.9 and sum(maxvio[-4:]) / 4 < 0.5 * maxvio[0]  # the sign rule oscillates by one step
