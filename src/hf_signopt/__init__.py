"""hf_signopt: sign optimizers and loss-free load-balanced Mixture-of-Experts for Hugging Face Transformers.

Importing this package registers the optimizers with `transformers.TrainingArguments(optim=...)`
and the `lossfree_moe` model type with the `Auto*` classes. Registration is idempotent.
"""

__version__ = "0.1.0"

from .integrations import SIGN_OPTIMIZERS, register_sign_optimizers, register_trainer_optimizer
from .integrations.auto_lossfree_moe import register_lossfree_moe
from .integrations.peft_router_bias import register_peft_router_bias
from .integrations.trainer_majority_vote import register_trainer_majority_vote
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
    TrainerBalanceCallback,
    add_router_bias,
    attached_balancer,
    disable_balancing,
    enable_balancing,
    register_trainer_balance_callback,
    router_param_groups,
)
from . import assignment, distributed
from .assignment import BalancedVectorQuantizer, VectorQuantizerOutput, balanced_assignment
from .distributed import enable_majority_vote, majority_vote_hook
from .optim import Lion, SignMomentum, Signum, Simba

# `TrainingArguments(optim="lion" | "signum" | "signsgd" | "signmomentum" | "simba")`.
register_sign_optimizers()
# `AutoConfig` / `AutoModel*` resolve `model_type="lossfree_moe"`.
register_lossfree_moe()
# Every `Trainer` reports (and, under DeepSpeed, makes) the bias updates of a model that balances itself.
register_trainer_balance_callback()
# PEFT adapters save the router biases (PEFT is wrapped when it is imported).
register_peft_router_bias()
# `optim_args="majority_vote=true"`: the Trainer's DDP model leaves the gradients to the optimizer's vote.
register_trainer_majority_vote()

__all__ = [
    "__version__",
    "BalancedVectorQuantizer",
    "Lion",
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
    "SIGN_OPTIMIZERS",
    "SignMomentum",
    "Signum",
    "Simba",
    "TrainerBalanceCallback",
    "VectorQuantizerOutput",
    "add_router_bias",
    "assignment",
    "attached_balancer",
    "balanced_assignment",
    "disable_balancing",
    "distributed",
    "enable_balancing",
    "enable_majority_vote",
    "majority_vote_hook",
    "register_lossfree_moe",
    "register_trainer_majority_vote",
    "register_sign_optimizers",
    "register_trainer_balance_callback",
    "register_trainer_optimizer",
    "router_param_groups",
]
