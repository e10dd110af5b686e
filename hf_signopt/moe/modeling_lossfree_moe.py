"""Loss-free balanced Mixture-of-Experts: transformers' Mixtral, except the router.

The router adds a per-expert bias (`e_score_correction_bias`, float32 whatever the model dtype) to the routing
scores to choose the top-k experts, and gates the chosen experts with the unbiased scores. Everything else
(attention, experts with their implementation dispatch, norms, rotary embedding, the causal-LM head and
Mixtral's auxiliary loss) is Mixtral's own code, reused by subclassing.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.models.mixtral.modeling_mixtral import (
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralPreTrainedModel,
    MixtralRMSNorm,
    MixtralRotaryEmbedding,
    MixtralTopKRouter,
)
from transformers.utils import logging

from .configuration_lossfree_moe import LossFreeMoeConfig

logger = logging.get_logger(__name__)

BIAS_NAME = "e_score_correction_bias"


class LossFreeMoeTopKRouter(MixtralTopKRouter):
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

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)`, `.half()`, `.bfloat16()` all go through `_apply`: follow the device, keep float32
        # values bit for bit (a bf16 round trip would move the bias by up to 0.4%).
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        moved = self.e_score_correction_bias
        if moved.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(device=moved.device)
        return self


class LossFreeMoeDecoderLayer(MixtralDecoderLayer):
    """Mixtral's decoder layer (attention, sparse MoE block, norms) with a [`LossFreeMoeTopKRouter`] as gate."""

    def __init__(self, config: LossFreeMoeConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        # Only the router changes; the block keeps Mixtral's experts and forward. The replaced router held one
        # uninitialized (num_experts, hidden_size) tensor.
        self.mlp.gate = LossFreeMoeTopKRouter(config)


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


class LossFreeMoeModel(LossFreeMoePreTrainedModel, MixtralModel):
    """Mixtral's decoder stack (`MixtralModel.forward`) built from [`LossFreeMoeDecoderLayer`]s."""

    def __init__(self, config: LossFreeMoeConfig):
        config.validate()  # fields may have been edited since the config was built
        PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [LossFreeMoeDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = MixtralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MixtralRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class LossFreeMoeForCausalLM(LossFreeMoePreTrainedModel, MixtralForCausalLM):
    """Mixtral's causal-LM head and loss (`MixtralForCausalLM.forward`, including the optional aux loss and
    `generate()`) on a [`LossFreeMoeModel`]."""

    def __init__(self, config: LossFreeMoeConfig):
        PreTrainedModel.__init__(self, config)
        self.model = LossFreeMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()


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
