"""SignMomentum: momentum of gradient signs (seed 000, "sign GD with momentum")."""

from typing import Any

import torch

from . import _functional as F
from ._base import MomentumSignOptimizer


class SignMomentum(MomentumSignOptimizer):
    r"""SignMomentum: an exponential moving average of gradient signs is the step.

    With decoupled weight decay applied first, for each element::

        p <- p * (1 - lr * weight_decay)
        m <- momentum * m + (1 - momentum) * sign(g)     # sign(0) = 0
        p <- p - lr * m

    Unlike Signum the step size varies per element (``|m| <= 1``), shrinking where gradient signs
    disagree over time.

    State: ``momentum_buffer`` (``m``), same dtype as the parameter.

    Args:
        params: Parameters or parameter-group dicts.
        lr: Learning rate, >= 0.
        momentum: Momentum coefficient in [0, 1).
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
        init = lambda p: {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}  # noqa: E731
        for impl, params, grads, (buffers,), count in self._buckets(group, init, ("momentum_buffer",)):
            F.sign_momentum_step(params, grads, buffers, lr=group["lr"], momentum=group["momentum"],
                                 weight_decay=group["weight_decay"], nonfinite_count=count, impl=impl)
