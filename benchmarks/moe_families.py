"""Which MoE families of the installed transformers `hf_signopt.add_router_bias` converts: a markdown table.

Every model type whose modeling module defines a `...Router` / `...Gate` class is built tiny (hidden 32, 2 layers,
4 experts, top-2, vocab 64, random weights, no download) as its causal-LM class, or as its base model when it has
none (the text model of a multimodal family, an encoder-decoder), and classified:

- `converted`: `add_router_bias` converted it, and with the zero bias its logits (or last hidden state) are bitwise
  those of the unconverted model; the row says what the router ranks, which is what the bias is added to;
- `native`: a module already holds an `e_score_correction_bias` (`add_router_bias` returns the model unchanged);
  the row says which module holds it and whether `LossFreeBalancer` can balance it;
- `unsupported`: `add_router_bias` raises ValueError; the row says why, per router class.

    python benchmarks/moe_families.py            # about 10 s on 2 CPU cores

`tests/test_moe_router_bias.py` runs the same survey and checks the result against the lists it expects.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch.overrides import TorchFunctionMode
from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers.utils import logging as hf_logging

from hf_signopt import LossFreeBalancer, add_router_bias
from hf_signopt.moe.balancer import find_routers
from hf_signopt.moe.router_bias import moe_routers, router_bias_problem

VOCAB = 64
TOKENS = (2, 8)
# Size fields shared by many configs; each is set only on the configs that have it.
TINY = {
    "hidden_size": 32,
    "intermediate_size": 32,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "shared_intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": VOCAB,
    "max_position_embeddings": 64,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_topk": 2,
    "first_k_dense_replace": 0,
    "num_dense_layers": 0,
    "decoder_sparse_step": 1,
    "n_group": 1,
    "topk_group": 1,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 2,
    "linear_head_dim": 8,
    "linear_num_heads": 2,
}
# What a family needs beyond `TINY` to build tiny with MoE layers (by model_type).
FAMILY_OVERRIDES: dict[str, dict] = {
    "axk1": {"head_dim": 8},
    "beam": {"mlp_layer_types": ["sparse", "sparse"]},
    "dbrx": {
        "d_model": 32,
        "n_heads": 2,
        "n_layers": 2,
        "max_seq_len": 64,
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "deepseek_v3": {"head_dim": 8},
    "deepseek_v4": {"mlp_layer_types": ["hash_moe", "moe"]},
    "dots1": {"n_shared_experts": 1},
    "flint": {"mlp_only_layers": []},
    "gemma4_text": {
        "enable_moe_block": True,
        "top_k_experts": 2,
        "vocab_size_per_layer_input": VOCAB,
        "hidden_size_per_layer_input": 8,
    },
    "glm4v_moe_text": {
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e4,
            "partial_rotary_factor": 0.5,
            "mrope_section": [2, 1, 1],
        }
    },
    "glm5_next_text": {
        "qk_rope_head_dim": 0,
        "mlp_layer_types": ["sparse", "sparse"],
        "index_head_dim": 8,
        "index_n_heads": 2,
        "index_topk": 4,
        "index_kpool": 2,
    },
    "granitemoehybrid": {"mamba_n_heads": 4, "mamba_d_state": 8, "mamba_chunk_size": 8},
    "hy_v4_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "longcat_flash": {
        "num_layers": 1,
        "head_dim": 8,
        "ffn_hidden_size": 32,
        "expert_ffn_hidden_size": 16,
        "zero_expert_num": 2,
    },
    "mimo_v2_flash": {"num_key_value_heads": 1},
    "nllb-moe": {
        "d_model": 32,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_sparse_step": 1,
        "expert_capacity": 8,
    },
    "switch_transformers": {
        "d_model": 32,
        "d_kv": 16,
        "d_ff": 32,
        "num_layers": 1,
        "num_decoder_layers": 1,
        "num_sparse_encoder_layers": 1,
        "num_sparse_decoder_layers": 1,
        "num_heads": 2,
        "expert_capacity": 8,
    },
    "zaya": {"num_experts_per_tok": 1},
}
ROUTER_CLASS = re.compile(r"^class (\w+(?:Router|Gate))\(", re.MULTILINE)
NOT_ROUTERS = re.compile(r"ForgetGate|MessageGate|ResidualGate|DensityRouter")
TOWER = re.compile(r"_(vision|audio)")


@dataclass(frozen=True)
class FamilyRow:
    """One family of the table.

    Attributes:
        family: The config's `model_type`.
        model_class: The model class built.
        routers: Class names of the model's routers.
        status: `native`, `converted`, `unsupported`, or `failed` (could not be built or checked).
        detail: Why unsupported, how the native bias is held, or the error.
    """

    family: str
    model_class: str
    routers: str
    status: str
    detail: str = ""


def _defines_router(model_type: str) -> bool:
    """Whether the modeling module of `model_type` defines a `...Router` / `...Gate` class (not a gated norm, ...)."""
    module = model_type_to_module_name(model_type)
    source = Path(transformers.__file__).parent / "models" / module / f"modeling_{module}.py"
    return source.is_file() and any(not NOT_ROUTERS.search(name) for name in ROUTER_CLASS.findall(source.read_text()))


@functools.cache
def moe_families() -> dict[str, str]:
    """`{model_type: model class name}` of the MoE families of the installed transformers, one per model class.

    A family is MoE when its modeling module defines a `...Router` or `...Gate` class. Each is built as its
    `...ForCausalLM` class; a family without one (the text model of a multimodal family, an encoder-decoder) as its
    base model, unless its config is composite (vision or audio towers) or it is itself a vision or audio tower.
    """
    families = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        if class_name.endswith("ForCausalLM") and class_name not in families.values() and _defines_router(model_type):
            families[model_type] = class_name
    for model_type, class_name in MODEL_MAPPING_NAMES.items():
        covered = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or TOWER.search(model_type)
        if not covered and not CONFIG_MAPPING[model_type].sub_configs and _defines_router(model_type):
            families[model_type] = class_name
    return families


def model_class(model_type: str, class_name: str) -> type[transformers.PreTrainedModel]:
    """The model class `class_name` of `model_type`, imported from its modeling module."""
    module = model_type_to_module_name(model_type)
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), class_name)


def tiny_model(model_type: str, class_name: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random `class_name` of `model_type`, in eval mode, from its own config class.

    Args:
        model_type: The family.
        class_name: The model class to build.
        seed: Seeds the random weights.
        **overrides: Config fields set over the tiny sizes and `FAMILY_OVERRIDES`.
    """
    cls = model_class(model_type, class_name)
    fields = set(cls.config_class().to_dict()) | set(cls.config_class.attribute_map)
    sizes = {key: value for key, value in TINY.items() if key in fields}
    config = cls.config_class(**(sizes | FAMILY_OVERRIDES.get(model_type, {}) | overrides))
    torch.manual_seed(seed)
    return cls(config).eval()


def model_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Random token ids for `model` (also as decoder inputs for an encoder-decoder), without a cache."""
    input_ids = torch.randint(3, VOCAB, TOKENS, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": input_ids, "use_cache": False}
    if "decoder_input_ids" in inspect.signature(model.forward).parameters:
        inputs["decoder_input_ids"] = input_ids
    return inputs


def first_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The first output of one forward: the logits of a causal LM, the last hidden state of a base model."""
    with torch.no_grad():
        return model(**inputs)[0]


def _router_names(model: torch.nn.Module) -> str:
    return ", ".join(sorted({type(router).__name__ for _, router in moe_routers(model)})) or "-"


def _unsupported_detail(model: torch.nn.Module) -> str:
    """Why `add_router_bias` rejects the model's router classes, and its own bias tensors if any; "" if it won't."""
    problems = {}
    for _, router in moe_routers(model):
        if type(router).__name__ not in problems:
            problems[type(router).__name__] = router_bias_problem(router)
    reasons = [f"{name}: {problem}" for name, problem in problems.items() if problem is not None]
    if not problems:
        reasons = ["no `gate` / `router` module next to an `experts` module"]
    if not reasons:
        return ""
    frozen = [*model.named_buffers(), *((name, p) for name, p in model.named_parameters() if not p.requires_grad)]
    others = sorted({name.rsplit(".", 1)[-1] for name, _ in frozen if "bias" in name.rsplit(".", 1)[-1]})
    if others:
        reasons.append(f"balances with its own `{'`, `'.join(others)}`")
    return "; ".join(reasons)


class _RankedScores(TorchFunctionMode):
    """Keeps the scores the last `torch.topk` called while active ranked."""

    scores: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.topk, torch.Tensor.topk):
            self.scores = args[0]
        return func(*args, **(kwargs or {}))


def _ranked_kind(model: torch.nn.Module) -> str:
    """What the first router of `model` ranks: softmax probabilities, sigmoid scores or logits."""
    _, router = moe_routers(model)[0]
    weight = next(p for p in router.parameters() if p.dim() == 2)
    with torch.no_grad(), _RankedScores() as recorder:
        router(torch.randn(16, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype))
    scores = recorder.scores.float()
    if ((scores >= 0) & (scores <= 1)).all():
        sums_to_one = torch.allclose(scores.sum(dim=-1), torch.ones(()), atol=1e-4)
        return "softmax probabilities" if sums_to_one else "sigmoid scores"
    return "logits"


def _native_detail(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> str:
    """Where the native bias is held, and whether `LossFreeBalancer` can balance the modules holding it."""
    holders = ", ".join(sorted({type(module).__name__ for _, module in find_routers(model)}))
    try:
        balancer = LossFreeBalancer(model)
    except ValueError as error:
        return f"bias on {holders}; LossFreeBalancer rejects it ({error})"
    try:
        model.train()
        model(**inputs)
        balancer.step()
    except TypeError:
        return f"bias on {holders}, which does not return the routing triple: LossFreeBalancer cannot count it"
    finally:
        balancer.remove()
        model.eval()
    return f"bias on {holders}"


def classify(model_type: str, class_name: str) -> FamilyRow:
    """Build `model_type` tiny and tell how `add_router_bias` treats it (see the module docstring)."""
    try:
        model = tiny_model(model_type, class_name)
        inputs = model_inputs(model)
        routers = _router_names(model)
        if find_routers(model):
            return FamilyRow(model_type, class_name, routers, "native", _native_detail(model, inputs))
        unsupported = _unsupported_detail(model)
        if unsupported:
            try:
                add_router_bias(model)
            except ValueError:
                return FamilyRow(model_type, class_name, routers, "unsupported", unsupported)
            return FamilyRow(model_type, class_name, routers, "failed", f"converted, though {unsupported}")
        reference, ranked = first_output(model, inputs), _ranked_kind(model)
        add_router_bias(model)
        if not torch.equal(first_output(model, inputs), reference):
            return FamilyRow(model_type, class_name, routers, "failed", "zero-bias outputs differ")
        return FamilyRow(model_type, class_name, routers, "converted", f"bias added to the {ranked}")
    except Exception as error:  # a family that cannot be built tiny is reported, not hidden
        return FamilyRow(model_type, class_name, "?", "failed", f"{type(error).__name__}: {error}"[:300])


def survey() -> list[FamilyRow]:
    """Classify every MoE family of the installed transformers (on one thread: the models are tiny)."""
    verbosity, threads = hf_logging.get_verbosity(), torch.get_num_threads()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    try:
        return [classify(model_type, name) for model_type, name in moe_families().items()]
    finally:
        hf_logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)


def markdown(rows: list[FamilyRow]) -> str:
    """The rows as a markdown table, grouped by status."""
    order = {"converted": 0, "native": 1, "unsupported": 2, "failed": 3}
    lines = ["| family | router | add_router_bias | notes |", "|---|---|---|---|"]
    for row in sorted(rows, key=lambda row: (order[row.status], row.family)):
        lines.append(f"| {row.family} | {row.routers} | {row.status} | {row.detail.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> None:
    start = time.perf_counter()
    rows = survey()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}\n")
    print(markdown(rows))
    counts = {status: sum(row.status == status for row in rows) for status in ("converted", "native", "unsupported")}
    print(f"\n{len(rows)} families: {counts}, {time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
