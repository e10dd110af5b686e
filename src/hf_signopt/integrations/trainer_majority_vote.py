"""`Trainer` support for `optim_args="majority_vote=true"` (`signum`, `signsgd`): DDP leaves the gradients local.

The Trainer wraps the model in DDP inside `Trainer._prepare_for_training`, which returns the wrapped model; the
wrapper calls `enable_majority_vote` on it when the Trainer's optimizer votes, before the first backward.
"""

from __future__ import annotations

from typing import Any

from ..distributed.majority_vote import enable_majority_vote, votes_in_step
from ._wrapping import unwrapped, wrapping


def register_trainer_majority_vote() -> None:
    """Wrap `transformers.Trainer._prepare_for_training` once (idempotent).

    Raises:
        ImportError: If the installed transformers has no `Trainer._prepare_for_training` to wrap.
    """
    from transformers import Trainer

    current = Trainer.__dict__.get("_prepare_for_training")
    if current is None:
        raise ImportError("hf_signopt's majority vote needs transformers' Trainer._prepare_for_training (5.x)")
    original = unwrapped(current)

    @wrapping(original)
    def _prepare_for_training(self: Any, *args: Any, **kwargs: Any) -> Any:
        model, train_dataloader = original(self, *args, **kwargs)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        if optimizer is not None and votes_in_step(optimizer):
            enable_majority_vote(model, optimizer)
        return model, train_dataloader

    Trainer._prepare_for_training = _prepare_for_training
