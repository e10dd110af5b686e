"""hf_signopt: sign optimizers and loss-free load-balanced Mixture-of-Experts for Hugging Face Transformers.

Importing this package registers the optimizers with `transformers.TrainingArguments(optim=...)`
and the `lossfree_moe` model type with the `Auto*` classes. Registration is idempotent.
"""

__version__ = "0.1.0"

from .optim import Lion, SignMomentum, Signum, Simba

# Trainer integration: `TrainingArguments(optim="lion" | "signum" | "signsgd" | "signmomentum" | "simba")`.
from .integrations import SIGN_OPTIMIZERS, register_sign_optimizers, register_trainer_optimizer


register_sign_optimizers()

__all__ = [
    "__version__",
    "Lion",
    "SignMomentum",
    "Signum",
    "Simba",
    "SIGN_OPTIMIZERS",
    "register_sign_optimizers",
    "register_trainer_optimizer",
]
