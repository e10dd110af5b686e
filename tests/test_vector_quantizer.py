"""BalancedVectorQuantizer: VQ-VAE forward and gradients, the float32 code bias, and its loss-free balancing."""

import copy

import pytest
import torch

from hf_signopt.assignment import BalancedVectorQuantizer


def quantizer(**kwargs) -> BalancedVectorQuantizer:
    torch.manual_seed(0)
    return BalancedVectorQuantizer(num_codes=8, dim=3, **kwargs)


def test_codes_are_the_biased_nearest_and_gradients_are_straight_through():
    vq = quantizer(commitment_cost=0.25, follow_optimizer=False)
    vq.code_bias.copy_(torch.linspace(0, 0.01, 8))
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = vq(x)
    expected = (torch.cdist(x.detach().reshape(-1, 3), vq.codebook.detach()).square() + vq.code_bias).argmin(dim=1)
    assert torch.equal(out.indices, expected.view(4, 5))
    codes = vq.codebook.detach()[expected].view_as(x)
    torch.testing.assert_close(out.quantized, codes)
    # Straight through: the gradient of any function of `quantized` reaches the input unchanged.
    weight = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(2))
    (gradient,) = torch.autograd.grad((out.quantized * weight).sum(), x, retain_graph=True)
    assert torch.equal(gradient, weight)
    # VQ-VAE losses: codebook ||sg[z] - e||^2 + beta * commitment ||z - sg[e]||^2, as means over the 60 elements.
    difference = (x.detach() - codes)
    torch.testing.assert_close(out.loss, 1.25 * difference.square().mean())
    x_grad, code_grad = torch.autograd.grad(out.loss, [x, vq.codebook])
    torch.testing.assert_close(x_grad, 0.25 * 2 * difference / 60)
    expected_code_grad = torch.zeros(8, 3).index_add_(0, expected, -2 * difference.reshape(-1, 3) / 60)
    torch.testing.assert_close(code_grad, expected_code_grad)


def test_bias_is_a_float32_buffer_in_the_state_dict():
    vq = quantizer()
    vq.code_bias.fill_(0.125)
    state = vq.state_dict()
    assert set(state) == {"codebook", "code_bias"} and state["code_bias"].dtype == torch.float32
    restored = quantizer()
    restored.load_state_dict(state)
    assert torch.equal(restored.code_bias, torch.full((8,), 0.125))
    restored.half()
    assert restored.codebook.dtype == torch.float16 and restored.code_bias.dtype == torch.float32
    assert restored(torch.randn(6, 3).half()).indices.shape == (6,)


def test_step_moves_the_bias_by_the_sign_of_the_load_error():
    vq = quantizer(update_rate=0.5, follow_optimizer=False)
    vq.codebook.data = torch.eye(8, 3) * 10  # codes 3..7 sit at the origin: ties go to the lowest index, 3
    x = torch.tensor([[10.0, 0, 0]] * 4 + [[0, 10.0, 0]] * 2 + [[0, 0, 0]] * 2)  # loads 4, 2, 0, 2, 0, 0, 0, 0
    vq(x)
    usage = vq.step()
    assert usage.tolist() == [4, 2, 0, 2, 0, 0, 0, 0]
    # Mean load 1: over-used codes up by the rate, unused ones down (argmin: the MoE update negated).
    assert vq.code_bias.tolist() == [0.5, 0.5, -0.5, 0.5, -0.5, -0.5, -0.5, -0.5]
    assert vq.step().sum() == 0 and vq.code_bias.tolist()[0] == 0.5  # nothing counted: no move


def test_only_training_forwards_count():
    vq = quantizer(update_rate=0.5, follow_optimizer=False)
    x = torch.randn(16, 3)
    vq.eval()
    vq(x)
    vq.train()
    with torch.no_grad():
        vq(x)
    assert vq.step().sum() == 0


def test_bias_follows_the_optimizer_step_that_trains_the_codebook():
    vq = quantizer(update_rate=0.5)
    other = torch.nn.Parameter(torch.zeros(1))
    vq(torch.randn(16, 3)).loss.backward()
    torch.optim.SGD([other], lr=0.1).step()  # does not train the codebook
    assert torch.equal(vq.code_bias, torch.zeros(8))
    optimizer = torch.optim.SGD(vq.parameters(), lr=0.1)
    optimizer.step()
    moved = vq.code_bias.clone()
    assert moved.abs().sum() > 0
    optimizer.step()  # nothing counted since: no second update
    assert torch.equal(vq.code_bias, moved)
    copied = copy.deepcopy(vq)  # a copy follows too
    copied(torch.randn(16, 3))
    torch.optim.SGD(copied.parameters(), lr=0.1).step()
    assert not torch.equal(copied.code_bias, moved) and torch.equal(vq.code_bias, moved)
    manual = quantizer(update_rate=0.5, follow_optimizer=False)
    manual(torch.randn(16, 3))
    torch.optim.SGD(manual.parameters(), lr=0.1).step()
    assert torch.equal(manual.code_bias, torch.zeros(8))


def skewed_stream_usage(update_rate: float) -> torch.Tensor:
    """Train a 16-code quantizer on a skewed stream (90 % of the vectors in one of 16 clusters, all far from the
    codebook's initialization near the origin) and return the code usage over the last 20 of 100 batches."""
    torch.manual_seed(0)
    vq = BalancedVectorQuantizer(num_codes=16, dim=2, update_rate=update_rate)
    centers = torch.randn(16, 2) + 3
    optimizer = torch.optim.Adam(vq.parameters(), lr=0.05)
    usage = torch.zeros(16, dtype=torch.int64)
    for batch in range(100):
        which = torch.where(torch.rand(128) < 0.9, 0, torch.randint(0, 16, (128,)))
        out = vq(centers[which] + 0.3 * torch.randn(128, 2))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()  # also updates the bias
        if batch >= 80:
            usage += torch.bincount(out.indices, minlength=16)
    return usage


def test_balancing_revives_the_codes_a_skewed_stream_leaves_dead():
    # Squared distances of about 18 from the data to the unused codes: a rate of 0.5 closes them in ~40 updates.
    frozen, balanced = skewed_stream_usage(0.0), skewed_stream_usage(0.5)
    assert (frozen == 0).sum() >= 8  # plain VQ: the codes nearest the data take it all, the others get no gradient
    assert (balanced > 0).all()
    # MaxVio, (max load - mean) / mean: the balanced codebook is far closer to equal use.
    mean = balanced.sum() / 16
    assert (balanced.max() - mean) / mean < 0.25 * (frozen.max() - mean) / mean


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_codes": 0, "dim": 3}, r"num_codes must be an int >= 1, got 0"),
        ({"num_codes": 4, "dim": 2.0}, r"dim must be an int >= 1, got 2.0"),
        ({"num_codes": 4, "dim": 3, "update_rate": -1.0}, r"update_rate must be a finite number >= 0, got -1.0"),
        ({"num_codes": 4, "dim": 3, "update_rule": "adam"}, r"update_rule must be one of"),
        ({"num_codes": 4, "dim": 3, "commitment_cost": float("nan")}, r"commitment_cost must be a finite number"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BalancedVectorQuantizer(**kwargs)


def test_wrong_input_width_is_a_clear_error():
    with pytest.raises(ValueError, match=r"last dimension dim=3, got shape \(2, 4\)"):
        quantizer()(torch.randn(2, 4))
