"""The MoE balancer's fused C++ bias update against the torch operations it replaces."""

import pytest
import torch

from hf_signopt.bias_balancing import bias_update
from hf_signopt.optim import _cpu_kernels

pytestmark = pytest.mark.skipif(_cpu_kernels.load(required=False) is None,
                                reason="no C++ compiler for the fused CPU kernels")


@pytest.mark.parametrize("rule", ["sign", "linear"])
def test_fused_bias_update_is_torch_bit_for_bit(rule):
    generator = torch.Generator().manual_seed(0)
    experts, rate = 64, 3e-3
    counts = torch.randint(0, 10**6, (64, experts), generator=generator)
    counts[1] = 0  # a layer that routed no token
    counts[2] = 125  # equal loads
    # Loads past 2**24, where int64 -> float32 rounds, and odd totals, where the division rounds.
    counts[3] = torch.randint(2**24, 2**27, (experts,), generator=generator) * 2 + 1
    counts[4, 0] = 2**40
    biases = [torch.randn(experts, generator=generator) * 0.1 for _ in range(counts.shape[0])]
    biases[5] = biases[5].reshape(1, experts)  # Ernie 4.5 keeps (1, num_experts)
    increments = bias_update(counts, experts, rule, rate)
    expected = [b + increment.view(b.shape) for b, increment in zip(biases, increments)]
    if rule == "linear":  # the test tells torch's two roundings from one fused multiply-add's
        total = counts.sum(1, keepdim=True)
        quotients = (total - experts * counts).float() / total.clamp_min(1).float()
        start = torch.stack([b.reshape(-1) for b in biases]).double()
        one_rounding = (start + quotients.double() * float(torch.tensor(rate, dtype=torch.float32))).float()
        assert not torch.equal(one_rounding, torch.stack([e.reshape(-1) for e in expected]))
    _cpu_kernels.bias_update(counts, biases, rule, rate)
    assert all(torch.equal(b, e) for b, e in zip(biases, expected))

