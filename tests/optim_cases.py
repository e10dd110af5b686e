"""The optimizer configurations and implementation paths the optimizer tests run through."""

import pytest

from hf_signopt import Lion, SignMomentum, Signum, Simba
from hf_signopt.optim import _cpu_kernels

# name -> (class, hyperparameters besides lr and weight_decay): every algorithm and state layout.
OPTIMIZERS = {
    "lion": (Lion, dict(betas=(0.8, 0.95))),
    "signum": (Signum, dict(momentum=0.8)),
    "signsgd": (Signum, dict(momentum=0.0)),
    "sign_momentum": (SignMomentum, dict(momentum=0.8)),
    "simba": (Simba, dict(window_size=10, threshold=0.2)),
    "simba_int16_ema": (Simba, dict(window_size=200, threshold=0.01, momentum="ema")),
}

FUSED_CPU = pytest.param(dict(fused=True), id="fused", marks=pytest.mark.skipif(
    _cpu_kernels.load(required=False) is None, reason="no C++ compiler for the fused CPU kernel"))
PATHS = [FUSED_CPU, pytest.param(dict(foreach=True), id="foreach"),
         pytest.param(dict(foreach=False), id="single_tensor")]
