"""hf_signopt: sign optimizers and loss-free load-balanced Mixture-of-Experts for Hugging Face Transformers.

Importing this package registers the optimizers with `transformers.TrainingArguments(optim=...)`
and the `lossfree_moe` model type with the `Auto*` classes. Registration is idempotent.
"""

__version__ = "0.1.0"

from .moe.balance_callback import LossFreeBalanceCallback  # noqa: E402
from .moe.balancer import LoadBalanceMetrics, LossFreeBalancer  # noqa: E402

__all__ = ["__version__"]
__all__ += ["LoadBalanceMetrics", "LossFreeBalanceCallback", "LossFreeBalancer"]
