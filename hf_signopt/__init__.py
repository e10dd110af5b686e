"""hf_signopt: sign optimizers and loss-free load-balanced Mixture-of-Experts for Hugging Face Transformers.

Importing this package registers the optimizers with `transformers.TrainingArguments(optim=...)`
and the `lossfree_moe` model type with the `Auto*` classes. Registration is idempotent.
"""

__version__ = "0.1.0"

# Loss-free balanced MoE: model classes, and `lossfree_moe` registered with the Auto classes.
from .integrations.auto_lossfree_moe import register_lossfree_moe
from .moe import (
    LoadBalanceMetrics,
    LossFreeBalanceCallback,
    LossFreeBalancer,
    LossFreeMoeConfig,
    LossFreeMoeForCausalLM,
    LossFreeMoeForQuestionAnswering,
    LossFreeMoeForSequenceClassification,
    LossFreeMoeForTokenClassification,
    LossFreeMoeModel,
    LossFreeMoePreTrainedModel,
    LossFreeMoeTopKRouter,
)

register_lossfree_moe()

__all__ = [
    "__version__",
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
    "register_lossfree_moe",
]
