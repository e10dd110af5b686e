"""Signum and signSGD (Bernstein et al., 2018, "signSGD: Compressed Optimisation for Non-Convex Problems")."""

from typing import Any

from . import _functional as F
from ._base import MomentumSignOptimizer, document_implementation_args


@document_implementation_args
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
        lr: Learning rate, >= 0: a float or a 0-dim tensor.
        momentum: Momentum coefficient in [0, 1); 0 gives signSGD.
        weight_decay: Decoupled weight decay, >= 0.
    """

    _functional_step = staticmethod(F.signum_step)

    def _uses_buffers(self, group: dict[str, Any]) -> bool:
        return group["momentum"] != 0.0  # signSGD keeps no state
