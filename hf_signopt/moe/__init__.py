"""Loss-free load-balanced Mixture-of-Experts: Mixtral with a selection-only router bias."""

from .configuration_lossfree_moe import LossFreeMoeConfig
from .modeling_lossfree_moe import (
    LossFreeMoeForCausalLM,
    LossFreeMoeForQuestionAnswering,
    LossFreeMoeForSequenceClassification,
    LossFreeMoeForTokenClassification,
    LossFreeMoeModel,
    LossFreeMoePreTrainedModel,
    LossFreeMoeTopKRouter,
)

__all__ = [
    "LossFreeMoeConfig",
    "LossFreeMoeForCausalLM",
    "LossFreeMoeForQuestionAnswering",
    "LossFreeMoeForSequenceClassification",
    "LossFreeMoeForTokenClassification",
    "LossFreeMoeModel",
    "LossFreeMoePreTrainedModel",
    "LossFreeMoeTopKRouter",
]
