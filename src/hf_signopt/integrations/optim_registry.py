"""The `TrainingArguments(optim=...)` names of hf_signopt's sign optimizers."""

from __future__ import annotations

from ..optim import Lion, SignMomentum, Signum, Simba
from .trainer_optim import TrainerOptimizer, register_trainer_optimizer


__all__ = ["SIGN_OPTIMIZERS", "register_sign_optimizers"]

SIGN_OPTIMIZERS: dict[str, tuple[type, dict]] = {
    "lion": (Lion, {}),
    "signum": (Signum, {}),
    "signsgd": (Signum, {"momentum": 0.0}),
    "signmomentum": (SignMomentum, {}),
    "simba": (Simba, {}),
}
"""`optim` name -> (optimizer class, constructor arguments the name fixes). `signsgd` is Signum without momentum."""


def register_sign_optimizers() -> list[TrainerOptimizer]:
    """Registers every name in `SIGN_OPTIMIZERS` with transformers. Idempotent.

    Returns:
        The registered entries.

    Raises:
        ImportError: If the installed transformers lacks the Trainer internals the registration hooks into.
    """
    return [register_trainer_optimizer(name, cls, fixed) for name, (cls, fixed) in SIGN_OPTIMIZERS.items()]
