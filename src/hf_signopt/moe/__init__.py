"""Loss-free load-balanced Mixture-of-Experts: Mixtral with a selection-only router bias."""

from .balance_callback import LossFreeBalanceCallback, TrainerBalanceCallback, register_trainer_balance_callback
from .balancer import LoadBalanceMetrics, LossFreeBalancer, attached_balancer, disable_balancing, enable_balancing
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
from .router_bias import add_router_bias
from .router_lr import router_param_groups

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
    "TrainerBalanceCallback",
    "add_router_bias",
    "attached_balancer",
    "disable_balancing",
    "enable_balancing",
    "register_trainer_balance_callback",
    "router_param_groups",
]
