"""Loss-free balanced Mixture-of-Experts: transformers' Mixtral, except the router.

The router adds a per-expert bias (`e_score_correction_bias`, float32 whatever the model dtype) to the routing
scores to choose the top-k experts, and gates the chosen experts with the unbiased scores. Everything else
(attention, experts with their implementation dispatch, norms, rotary embedding, the causal-LM head and
Mixtral's auxiliary loss) is Mixtral's own code, reused by subclassing; the models are built by Mixtral's own
constructors, which build our decoder layer (and so our router) where they build Mixtral's.

`save_pretrained` writes the MoE blocks under Mixtral's Hub names (the conversion mapping registered in
`hf_signopt.integrations.auto_lossfree_moe`); each decoder layer reads those names back in `load_state_dict` too,
so `Trainer`'s checkpoint reload (`resume_from_checkpoint`, `load_best_model_at_end`) restores every weight.
"""

import re
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
)
from transformers.models.mixtral.modeling_mixtral import (
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralTopKRouter,
)
from transformers.utils import logging

from .balancer import BIAS_NAME, Float32RouterBias, LossFreeBalancer
from .configuration_lossfree_moe import LossFreeMoeConfig

logger = logging.get_logger(__name__)

# Mixtral's Hub checkpoint format: the decoder layer's `mlp` is saved as `block_sparse_moe`, and expert `e` of the
# fused `experts.gate_up_proj[e]` (gate rows, then up rows) / `experts.down_proj[e]` as `experts.e.w1` (gate),
# `experts.e.w3` (up) and `experts.e.w2` (down), each an nn.Linear weight.
_HUB_MOE_BLOCK = "block_sparse_moe."
_HUB_EXPERT_PROJECTIONS = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
_HUB_EXPERT_KEY = re.compile(r"experts\.(\d+)\.(w[123])\.weight")


def _load_hub_moe_weights(
    layer: nn.Module,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """`load_state_dict` pre-hook of a decoder layer: turns its MoE block's Hub-format keys into the model's own.

    `block_sparse_moe.<name>` becomes `mlp.<name>`, and the per-expert `w1`/`w3`/`w2` weights are fused into
    `mlp.experts.gate_up_proj` / `mlp.experts.down_proj` as transformers' Mixtral conversion does in
    `from_pretrained`. A state dict that holds only some of a fused tensor's pieces (one shard of a sharded
    checkpoint) loads those pieces over the current values, keeps the rest, and lists the absent pieces under their
    Hub names in `missing_keys`, so the next shard completes the tensor and `strict=True` names what is missing.
    """
    hub_prefix = prefix + _HUB_MOE_BLOCK
    hub_keys = [key for key in state_dict if key.startswith(hub_prefix)]
    if not hub_keys:
        return
    experts = layer.mlp.experts
    pieces = {}
    for key in hub_keys:
        tensor = state_dict.pop(key)
        name = key[len(hub_prefix) :]
        match = _HUB_EXPERT_KEY.fullmatch(name)
        if match is None:
            target = prefix + "mlp." + name
            if target in state_dict:
                error_msgs.append(f"The state dict holds both {key} and {target}, the same weight in two formats.")
            else:
                state_dict[target] = tensor
        elif int(match[1]) >= experts.num_experts:
            unexpected_keys.append(key)
        else:
            pieces[match[2], int(match[1])] = tensor

    for fused_name, projections in _HUB_EXPERT_PROJECTIONS.items():
        _fuse_expert_pieces(
            experts, fused_name, projections, pieces, hub_prefix, prefix + "mlp.experts.", state_dict, missing_keys,
            error_msgs,
        )


def _fuse_expert_pieces(
    experts: nn.Module,
    fused_name: str,
    projections: tuple[str, ...],
    pieces: dict[tuple[str, int], torch.Tensor],
    hub_prefix: str,
    experts_prefix: str,
    state_dict: dict[str, torch.Tensor],
    missing_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Puts `experts.<fused_name>` into `state_dict`, built from the per-expert `pieces` of the given projections.

    Expert `e` of the fused tensor is its projections' weights stacked along rows, in `projections` order. With
    every piece present the tensor is built from them alone; with some present it is the current value with those
    pieces written over, and the absent pieces' Hub names go to `missing_keys`.
    """
    wanted = {
        (projection, expert): hub_prefix + f"experts.{expert}.{projection}.weight"
        for expert in range(experts.num_experts)
        for projection in projections
    }
    present = [piece for piece in wanted if piece in pieces]
    if not present:
        return
    fused_key = experts_prefix + fused_name
    current = getattr(experts, fused_name)
    rows = current.shape[1] // len(projections)
    wrong_shapes = [
        f"size mismatch for {wanted[piece]}: copying a param with shape {pieces[piece].shape} from checkpoint, "
        f"the shape in current model is {torch.Size((rows, current.shape[2]))} (a slice of {fused_key})."
        for piece in present
        if pieces[piece].shape != (rows, current.shape[2])
    ]
    absent = [key for piece, key in wanted.items() if piece not in pieces]
    if fused_key in state_dict:
        error_msgs.append(f"The state dict holds both {fused_key} and its per-expert pieces ({wanted[present[0]]}).")
    elif wrong_shapes:
        error_msgs.extend(wrong_shapes)
    elif not absent:
        state_dict[fused_key] = torch.stack(
            [torch.cat([pieces[projection, expert] for projection in projections]) for expert in range(len(current))]
        )
    elif current.is_meta:
        error_msgs.append(
            f"{fused_key} is on the meta device, so it cannot be completed from its current value; "
            f"the state dict lacks {', '.join(absent)}."
        )
    else:
        fused = current.detach().clone()
        for projection, expert in present:
            start = projections.index(projection) * rows
            fused[expert, start : start + rows] = pieces[projection, expert]
        state_dict[fused_key] = fused
        missing_keys.extend(absent)


def _building_ours(init: Callable, **classes: type[nn.Module]) -> Callable:
    """Returns the constructor `init` of a Mixtral class, building `classes` where it builds the Mixtral classes of
    the same names (e.g. `MixtralDecoderLayer=LossFreeMoeDecoderLayer`).

    A transformers modular model writes only what differs, and transformers' converter writes the parent's
    `__init__` out again with the subclass's building blocks in it. This is that, without the copy: Mixtral's own
    code, run with our classes under Mixtral's names, so it builds the same modules in the same order and draws the
    same random numbers (the same weights for the same seed). Mixtral's module is left as it is; its other names
    are read as they are when this is called.

    Raises:
        TypeError: If `init` does not name one of `classes` (a transformers version whose Mixtral is built
            differently), instead of silently building Mixtral's class.
    """
    codes, names = [init.__code__], set()
    while codes:  # the function and the comprehensions inside it
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    unused = sorted(set(classes) - names)
    if unused:
        raise TypeError(f"{init.__qualname__} does not build {unused} in this version of transformers.")
    return types.FunctionType(
        init.__code__, {**init.__globals__, **classes}, init.__name__, init.__defaults__, init.__closure__
    )


class LossFreeMoeTopKRouter(Float32RouterBias, MixtralTopKRouter):
    """Mixtral's top-k router with a selection-only, float32 per-expert bias.

    Returns `(router_logits, top_k_weights, top_k_index)` like [`~transformers.MixtralTopKRouter`]: logits of
    shape `(tokens, num_experts)` in the model dtype, float32 gate weights and int64 expert indices, both of
    shape `(tokens, top_k)`.
    """

    def __init__(self, config: LossFreeMoeConfig):
        super().__init__(config)
        self.score_func = config.router_score_func
        self.norm_topk_prob = config.norm_topk_prob
        self.register_buffer(BIAS_NAME, torch.zeros(self.num_experts, dtype=torch.float32), persistent=True)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routes each token to `top_k` experts.

        Args:
            hidden_states: `(..., hidden_size)` token representations.

        Returns:
            `(router_logits, top_k_weights, top_k_index)`.
        """
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight)
        if self.score_func == "softmax":
            scores = torch.softmax(router_logits.float(), dim=-1)
        else:
            scores = torch.sigmoid(router_logits.float())
        top_k_index = torch.topk(scores + self.e_score_correction_bias, self.top_k, dim=-1).indices
        top_k_weights = scores.gather(-1, top_k_index)
        if self.norm_topk_prob:
            # The floor only matters for sigmoid scores that all underflow; softmax sums are >= 1 / num_experts.
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return router_logits, top_k_weights, top_k_index


class LossFreeMoeDecoderLayer(MixtralDecoderLayer):
    """Mixtral's decoder layer (attention, sparse MoE block, norms) with a [`LossFreeMoeTopKRouter`] as gate.

    Its `load_state_dict` also accepts the MoE block in Mixtral's Hub format (`block_sparse_moe.experts.N.w1/w2/w3`),
    the format `save_pretrained` writes, so a plain `model.load_state_dict(checkpoint)` restores every weight.
    """

    def __init__(self, config: LossFreeMoeConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        # Only the router changes; the block keeps Mixtral's experts and forward. The replaced router held one
        # uninitialized (num_experts, hidden_size) tensor.
        self.mlp.gate = LossFreeMoeTopKRouter(config)
        self.register_load_state_dict_pre_hook(_load_hub_moe_weights)


class LossFreeMoePreTrainedModel(MixtralPreTrainedModel):
    """Base class: config class, weight init (zero bias), fp32-kept bias and Mixtral-checkpoint loading."""

    config: LossFreeMoeConfig
    config_class = LossFreeMoeConfig
    _no_split_modules = ["LossFreeMoeDecoderLayer"]
    _keep_in_fp32_modules_strict = [BIAS_NAME]
    # Our experts are `MixtralExperts`, with its `@use_experts_implementation` dispatch (eager / batched_mm /
    # grouped_mm). transformers detects that by searching the model's module source for the decorator, which this
    # module does not contain, so it is declared here.
    _can_set_experts_implementation_cached_value = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LossFreeMoeTopKRouter):
            init.zeros_(module.e_score_correction_bias)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # A Mixtral checkpoint has every weight but no router bias: say so in one line instead of listing each
        # layer's bias in transformers' missing-keys report. `_init_weights` has already set them to zero.
        missing_bias = {key for key in loading_info.missing_keys if key.endswith(BIAS_NAME)}
        if missing_bias:
            loading_info.missing_keys = loading_info.missing_keys - missing_bias
            logger.warning(
                f"The checkpoint has no router bias (`{BIAS_NAME}`) for {len(missing_bias)} of "
                f"{self.config.num_hidden_layers} layers (a Mixtral checkpoint has none); those biases start at "
                "zero, where routing equals Mixtral's."
            )
        super()._adjust_missing_and_unexpected_keys(loading_info)


_build_mixtral_model = _building_ours(MixtralModel.__init__, MixtralDecoderLayer=LossFreeMoeDecoderLayer)


class LossFreeMoeModel(LossFreeMoePreTrainedModel, MixtralModel):
    """Mixtral's decoder stack (`MixtralModel.forward`) built from [`LossFreeMoeDecoderLayer`]s.

    With `config.router_bias_update_rate > 0` the model balances itself: a `LossFreeBalancer` with
    `follow_optimizer=True` is attached when it is built, so the biases move once per optimizer step in
    any training loop (plain PyTorch, accelerate, Trainer). `hf_signopt.disable_balancing(model)` opts out.
    """

    def __init__(self, config: LossFreeMoeConfig):
        config.validate()  # fields may have been edited since the config was built
        _build_mixtral_model(self, config)
        if config.router_bias_update_rate > 0:
            LossFreeBalancer(self, follow_optimizer=True, count_eval_tokens=True)  # the hooks keep it alive


class LossFreeMoeForCausalLM(LossFreeMoePreTrainedModel, MixtralForCausalLM):
    """Mixtral's causal-LM head and loss (`MixtralForCausalLM.forward`, including the optional aux loss and
    `generate()`) on a [`LossFreeMoeModel`]."""

    __init__ = _building_ours(MixtralForCausalLM.__init__, MixtralModel=LossFreeMoeModel)


class LossFreeMoeForSequenceClassification(GenericForSequenceClassification, LossFreeMoePreTrainedModel):
    """Sequence classification head (last non-padding token) on a [`LossFreeMoeModel`]."""


class LossFreeMoeForTokenClassification(GenericForTokenClassification, LossFreeMoePreTrainedModel):
    """Token classification head on a [`LossFreeMoeModel`]."""


class LossFreeMoeForQuestionAnswering(GenericForQuestionAnswering, LossFreeMoePreTrainedModel):
    """Extractive question-answering head (span start/end logits) on a [`LossFreeMoeModel`]."""


__all__ = [
    "LossFreeMoeDecoderLayer",
    "LossFreeMoeForCausalLM",
    "LossFreeMoeForQuestionAnswering",
    "LossFreeMoeForSequenceClassification",
    "LossFreeMoeForTokenClassification",
    "LossFreeMoeModel",
    "LossFreeMoePreTrainedModel",
    "LossFreeMoeTopKRouter",
]
