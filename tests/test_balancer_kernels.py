"""The MoE balancer's fused C++ count and bias update against the torch operations they replace."""

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


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_count_adds_each_layers_choices_to_its_row(dtype, masked):
    generator = torch.Generator().manual_seed(1)
    tokens, k, width = 50, 3, 6
    indices = [torch.randint(0, width, (tokens, k), generator=generator, dtype=dtype) for _ in range(4)]
    mask = torch.randint(0, 2, (tokens,), generator=generator) if masked else None
    counts = torch.randint(0, 5, (4, width), generator=generator)
    weights = torch.ones(tokens, dtype=torch.int64) if mask is None else mask
    expected = counts + torch.stack([
        torch.bincount(index.long().reshape(-1), weights[:, None].expand(-1, k).reshape(-1), minlength=width).long()
        for index in indices
    ])
    assert _cpu_kernels.count_choices(indices, mask, counts) == 0
    assert torch.equal(counts, expected)


def test_fused_count_reports_the_first_layer_out_of_range_and_counts_nothing():
    indices = [torch.zeros(4, 2, dtype=torch.int64) for _ in range(3)]
    indices[1][3, 1] = 6
    indices[2][0, 0] = -1
    counts = torch.zeros(3, 6, dtype=torch.int64)
    assert _cpu_kernels.count_choices(indices, None, counts) == 2
    assert counts.sum() == 0
    indices[1][3, 1] = 5
    assert _cpu_kernels.count_choices(indices, None, counts) == 3 and counts.sum() == 0
