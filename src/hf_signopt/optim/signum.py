"""Signum and signSGD (Bernstein et al., 2018, "signSGD: Compressed Optimisation for Non-Convex Problems"), also
with majority vote across data-parallel ranks (Bernstein et al., 2019)."""

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.majority_vote import majority_vote_signs
from . import _functional as F
from ._base import DEFAULT_NONFINITE_CHECK_INTERVAL, MomentumSignOptimizer, document_implementation_args


@document_implementation_args
class Signum(MomentumSignOptimizer):
    r"""Signum: step along the sign of the gradient's momentum; ``momentum=0`` is signSGD.

    With decoupled weight decay applied first, for each element::

        p <- p * (1 - lr * weight_decay)
        m <- momentum * m + (1 - momentum) * g
        p <- p - lr * sign(m)                  # sign(0) = 0

    With ``momentum=0`` the step is ``p <- p - lr * sign(g)`` and no state is kept.

    With ``majority_vote=True`` each data-parallel rank keeps the momentum of its own gradients, and every rank
    steps along the elementwise majority vote of the ranks' ``sign(m)`` (``sign(g)`` for signSGD), exchanged as
    one bit per element in one all-gather per step and parameter group
    (`hf_signopt.distributed.majority_vote_signs`). The gradients must then stay local: under DDP call
    ``hf_signopt.distributed.enable_majority_vote(ddp_model, optimizer)`` (the Trainer does it for
    ``optim_args="majority_vote=true"``). In one process the vote is ``sign(m)`` and the step equals Signum's.

    State: ``momentum_buffer`` (``m``), same dtype as the parameter; none for signSGD.

    Args:
        params: Parameters or parameter-group dicts.
        lr: Learning rate, >= 0: a float or a 0-dim tensor.
        momentum: Momentum coefficient in [0, 1); 0 gives signSGD.
        weight_decay: Decoupled weight decay, >= 0.
        majority_vote: Step along the majority vote of the data-parallel ranks' signs (a group option).
        process_group: The group the ranks vote in (default: the default group).
    """

    LATER_GROUP_DEFAULTS = {**MomentumSignOptimizer.LATER_GROUP_DEFAULTS, "majority_vote": False}
    _functional_step = staticmethod(F.signum_step)

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.1,
        *,
        majority_vote: bool = False,
        process_group: dist.ProcessGroup | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite_check_interval: int = DEFAULT_NONFINITE_CHECK_INTERVAL,
    ) -> None:
        self.process_group = process_group
        super().__init__(params, lr, momentum, weight_decay, foreach=foreach, fused=fused,
                         nonfinite_check_interval=nonfinite_check_interval, majority_vote=majority_vote)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("process_group", None)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if not isinstance(group["majority_vote"], bool):
            raise TypeError(f"majority_vote must be a bool, got {group['majority_vote']!r}")

    def _uses_buffers(self, group: dict[str, Any]) -> bool:
        return group["momentum"] != 0.0  # signSGD keeps no state

    def _step_group(self, group: dict[str, Any]) -> None:
        if not group["majority_vote"]:
            super()._step_group(group)
            return
        params, grads, momentum_buffers = [], [], []
        self._init_group(group, params, grads, momentum_buffers)
        if F.DTensor is not None and any(isinstance(p, F.DTensor) for p in params):
            raise ValueError("majority_vote needs replicated parameters (DDP); FSDP shards them")
        finite = [g.isfinite() for g in grads]
        for g, mask in zip(grads, finite):
            self._nonfinite_counts[g.device].add_(mask.numel() - mask.sum())
        local = self._local_momentum(grads, finite, momentum_buffers, group["momentum"]) if momentum_buffers else grads
        votes = majority_vote_signs(local, self.process_group)  # a non-finite gradient votes like a 0
        F.signum_step(params, votes, [], lr=group["lr"], momentum=0.0, weight_decay=group["weight_decay"],
                      **self._implementation_flags(group))

    @staticmethod
    def _local_momentum(grads: list[torch.Tensor], finite: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                        momentum: float) -> list[torch.Tensor]:
        """m <- momentum * m + (1 - momentum) * g from this rank's gradients, as Signum computes it (16-bit
        buffers in float32); non-finite gradient elements leave m unchanged."""
        for g, mask, m in zip(grads, finite, momentum_buffers):
            work = m.float() if m.dtype.itemsize < 4 else m
            work.lerp_(torch.where(mask, g.to(work.dtype), work), 1.0 - momentum)
            if work is not m:
                m.copy_(work)
        return momentum_buffers
