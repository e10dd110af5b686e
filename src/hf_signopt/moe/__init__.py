"""Loss-free load-balanced Mixture-of-Experts: Mixtral with a selection-only router bias."""

from .balance_callback import LossFreeBalanceCallback
from .balancer import LoadBalanceMetrics, LossFreeBalancer
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
    "LoadBalanceMetrics",
    "LossFreeBalanceCallback",
    "LossFreeBalancer",
    "LossFreeMoeConfig",
    "LossFreeMoeForCausalLM",
    "LossFreeMoeForQuestionAnswering",
    "LossFreeMoeForSequenceClassification",
    "LossFreeMoeForTokenClassification",
    "LossFreeMoeModel",
    "LossFreeMoePreTrainedModel",
    "LossFreeMoeTopKRouter",
]
