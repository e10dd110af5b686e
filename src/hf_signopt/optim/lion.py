"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms")."""

from collections.abc import Iterable
from typing import Any

import torch

from . import _functional as F
from ._base import DEFAULT_NONFINITE_CHECK_INTERVAL, SignOptimizer, document_implementation_args
from ._validation import check_lr, check_non_negative, check_unit_interval


@document_implementation_args
class Lion(SignOptimizer):
    r"""Lion: the sign of an interpolation between momentum and gradient.

    With decoupled weight decay applied first, for each element::

        p <- p * (1 - lr * weight_decay)
        c  = beta1 * m + (1 - beta1) * g
        p <- p - lr * sign(c)                  # sign(0) = 0
        m <- beta2 * m + (1 - beta2) * g

    State: ``exp_avg`` (``m``), same dtype as the parameter (4 bytes per float32 parameter).

    Args:
        params: Parameters or parameter-group dicts.
        lr: Learning rate, >= 0: a float or a 0-dim tensor. Lion's lr is usually 3-10x smaller than AdamW's.
        betas: ``(beta1, beta2)``, each in [0, 1).
        weight_decay: Decoupled weight decay, >= 0 (usually 3-10x larger than AdamW's).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 1.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite_check_interval: int = DEFAULT_NONFINITE_CHECK_INTERVAL,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults, nonfinite_check_interval)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2), each in [0, 1)")
        check_unit_interval("betas[0]", betas[0])
        check_unit_interval("betas[1]", betas[1])
        check_non_negative("weight_decay", group["weight_decay"])

    def _init_group(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                    exp_avgs: list[torch.Tensor]) -> None:
        self._with_grad(group, params, grads)
        exp_avgs.extend(self._state_or_zeros(p, "exp_avg") for p in params)

    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs = [], [], []
        self._init_group(group, params, grads, exp_avgs)
        if params:
            beta1, beta2 = group["betas"]
            F.lion_step(params, grads, exp_avgs, lr=group["lr"], beta1=beta1, beta2=beta2,
                        weight_decay=group["weight_decay"], **self._implementation_flags(group))
