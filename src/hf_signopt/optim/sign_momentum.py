"""SignMomentum: momentum of gradient signs (seed 000, "sign GD with momentum")."""

from . import _functional as F
from ._base import MomentumSignOptimizer, document_implementation_args


@document_implementation_args
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
        lr: Learning rate, >= 0: a float or a 0-dim tensor.
        momentum: Momentum coefficient in [0, 1).
        weight_decay: Decoupled weight decay, >= 0.
    """

    _functional_step = staticmethod(F.sign_momentum_step)
