"""Simba (momentum="counts") against the reference code published with the method.

`SeedSimba` below is the reference implementation from MTandHJ, "Simba: 符号梯度的可行性"
(2025-05-08; seed 001 of this project), pasted with only formatting changes. It keeps the counter
in int16 and wraps on overflow at 32767; our Simba saturates, which only differs at
window_size=32767 (covered separately below).
"""

import pytest
import torch
from torch.optim.optimizer import Optimizer

from hf_signopt import Simba
from hf_signopt.optim import _cpu_kernels


class SeedSimba(Optimizer):
    def __init__(self, params, lr=1e-4, window_size: int = 128, threshold: float = 0.1, weight_decay=0.0):
        if not 0.0 <= lr:
            raise ValueError("Invalid learning rate: {}".format(lr))
        defaults = dict(lr=lr, window_size=window_size, threshold=threshold, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue

                # Perform stepweight decay
                p.data.mul_(1 - group["lr"] * group["weight_decay"])

                grad = p.grad
                state = self.state[p]
                # State initialization
                if len(state) == 0:
                    # Exponential moving average of gradient values
                    state["sign_counts"] = torch.zeros_like(p, dtype=torch.int16)

                sign_counts = state["sign_counts"]
                window_size, threshold = group["window_size"], group["threshold"]
                threshold = int(window_size * threshold)
                # Weight update
                update = torch.where(sign_counts.abs() > threshold, sign_counts.sign(), grad.sign())

                p.add_(update, alpha=-group["lr"])

                # Decay the momentum running average coefficient
                sign_counts.add_(grad.sign().to(torch.int16)).clamp_(-window_size, window_size)
        return loss


PATHS = [
    pytest.param(dict(fused=True), id="fused", marks=pytest.mark.skipif(
        _cpu_kernels.load(required=False) is None, reason="no C++ compiler for the fused CPU kernel")),
    pytest.param(dict(foreach=True), id="foreach"),
    pytest.param(dict(foreach=False), id="single_tensor"),
]

GROUPS = [
    dict(lr=1e-2, window_size=16, threshold=0.25, weight_decay=0.1),
    dict(lr=5e-3, window_size=127, threshold=0.05, weight_decay=0.0),
    dict(lr=2e-2, window_size=128, threshold=0.1, weight_decay=0.3),
    dict(lr=1e-3, window_size=1000, threshold=0.01, weight_decay=0.05),
]


def build(cls, seed, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (40, 33, 64, 50, 17, 9, 21, 12)]
    groups = [{"params": params[2 * i:2 * i + 2], **hp} for i, hp in enumerate(GROUPS)]
    return params, cls(groups, **kwargs)


@pytest.mark.parametrize("path", PATHS)
def test_simba_counts_equals_seed_reference(path):
    ours_params, ours = build(Simba, 0, **path)
    seed_params, seed = build(SeedSimba, 0)
    gen = torch.Generator().manual_seed(1)
    drift = [torch.randn(p.shape, generator=gen).sign() * (torch.rand(p.shape, generator=gen) < 0.5)
             for p in ours_params]
    for _ in range(150):
        for p, q, d in zip(ours_params, seed_params, drift):
            g = torch.randn(p.shape, generator=gen) + d
            g[torch.rand(p.shape, generator=gen) < 0.1] = 0.0  # sign(0) = 0
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        seed.step()
    for i, (p, q) in enumerate(zip(ours_params, seed_params)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)  # float32 rounding; a sign flip is >= 1e-3
        counts = ours.state[p]["sign_counts"]
        window = GROUPS[i // 2]["window_size"]
        assert counts.dtype == (torch.int8 if window <= 127 else torch.int16)
        assert torch.equal(counts.to(torch.int16), seed.state[q]["sign_counts"])
        assert counts.abs().max() <= window


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("window_size", [127, 32767])
def test_counts_saturate_at_dtype_limit(window_size, path):
    """At w = 127 (int8) and w = 32767 (int16) the counter stays at +-w instead of wrapping."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = Simba([p], lr=1.0, window_size=window_size, threshold=1.0, **path)
    p.grad = torch.zeros(4)
    opt.step()  # creates the state; sign(0) = 0 changes nothing
    assert p.tolist() == [0.0] * 4 and opt.state[p]["sign_counts"].tolist() == [0] * 4
    opt.state[p]["sign_counts"].copy_(torch.tensor([window_size, -window_size, window_size, 0]))
    p.grad = torch.tensor([1.0, -1.0, -1.0, 1.0])
    opt.step()
    assert opt.state[p]["sign_counts"].tolist() == [window_size, -window_size, window_size - 1, 1]
    # threshold=1.0: |s| > w never holds, so the update is -lr * sign(g)
    assert p.tolist() == [-1.0, 1.0, 1.0, -1.0]
