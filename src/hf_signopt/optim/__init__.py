"""Sign optimizers: Lion, Signum (and signSGD), SignMomentum and Simba, as `torch.optim.Optimizer`s."""

from .lion import Lion
from .sign_momentum import SignMomentum
from .signum import Signum
from .simba import Simba

__all__ = ["Lion", "SignMomentum", "Signum", "Simba"]
