"""Signum and signSGD (Bernstein et al., 2018, "signSGD: Compressed Optimisation for Non-Convex Problems")."""

from typing import Any

import torch

from . import _functional as F
from ._base import MomentumSignOptimizer


class Signum(MomentumSignOptimizer):
    r"""Signum: step along the sign of the gradient's momentum; ``momentum=0`` is signSGD.

    With decoupled weight decay applied first, for each element::

        p <- p * (1 - lr * weight_decay)
        m <- momentum * m + (1 - momentum) * g
        p <- p - lr * sign(m)                  # sign(0) = 0

    With ``momentum=0`` the step is ``p <- p - lr * sign(g)`` and no state is kept.

    State: ``momentum_buffer`` (``m``), same dtype as the parameter; none for signSGD.

    Args:
        params: Parameters or parameter-group dicts.
        lr: Learning rate, >= 0.
        momentum: Momentum coefficient in [0, 1); 0 gives signSGD.
        weight_decay: Decoupled weight decay, >= 0.
        foreach: Use the batched torch path (True), the per-tensor torch path (False) or decide
            automatically (None).
        fused: Use the fused single-pass C++/OpenMP CPU kernel (True), never (False) or when it
            applies (None: CPU float32/bfloat16 parameters and a working compiler). On CUDA the
            default is the foreach path.
        nonfinite_check_interval: Every this many steps read the device-side count of skipped
            non-finite gradient elements and warn if it grew (0: only on `nonfinite_grad_count()`).
    """

    def _step_group(self, group: dict[str, Any]) -> None:
        if group["momentum"] == 0.0:
            init, keys = (lambda p: {}), ()
        else:
            init = lambda p: {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}  # noqa: E731
            keys = ("momentum_buffer",)
        for impl, params, grads, state_lists, count in self._buckets(group, init, keys):
            F.signum_step(params, grads, state_lists[0] if state_lists else [], lr=group["lr"],
                          momentum=group["momentum"], weight_decay=group["weight_decay"], nonfinite_count=count,
                          impl=impl)
