"""balanced_assignment against scipy's Hungarian solver (linear_sum_assignment), and the shared bias-update core."""

import math

import pytest
import torch

from hf_signopt.assignment import balanced_assignment
from hf_signopt.bias_balancing import bias_update, max_violation

scipy_optimize = pytest.importorskip("scipy.optimize")


def optimum(cost: torch.Tensor, capacity: torch.Tensor) -> float:
    """Exact optimum of the capacitated problem: the Hungarian method on `capacity[j]` copies of each column."""
    columns = torch.repeat_interleave(torch.arange(cost.shape[1]), capacity)
    rows, chosen = scipy_optimize.linear_sum_assignment(cost[:, columns].double().numpy())
    return float(cost.double().numpy()[rows, columns.numpy()[chosen]].sum())


def total(cost: torch.Tensor, target: torch.Tensor) -> float:
    return float(cost.double()[torch.arange(cost.shape[0]), target].sum())


def shared_preference(n: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """Every object ranks the targets alike (target 0 cheapest), scaled per object, plus a little noise."""
    scale = torch.rand(n, 1, generator=generator, dtype=torch.float64)
    return scale * torch.linspace(0, 1, m, dtype=torch.float64) + 0.1 * torch.rand(n, m, generator=generator,
                                                                                  dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["random", "shared"])
def test_square_is_a_permutation_near_the_hungarian_optimum(kind, dtype):
    generator = torch.Generator().manual_seed(0)
    n = 128
    cost = torch.rand(n, n, generator=generator, dtype=torch.float64) if kind == "random" else shared_preference(
        n, n, generator)
    if kind == "shared":  # the plain argmin piles the objects onto few targets: the balancing has work to do
        assert torch.bincount(cost.argmin(dim=1), minlength=n).max() > 10
    target = balanced_assignment(cost.to(dtype))
    assert target.dtype == torch.int64 and target.shape == (n,)
    assert torch.equal(target.sort().values, torch.arange(n))
    best = optimum(cost, torch.ones(n, dtype=torch.int64))
    got = total(cost, target)
    spread = float((cost - cost.min(dim=1, keepdim=True).values).max())
    # Feasible, so never below the optimum; eps-optimal auction: at most n * final_step = spread / 100 above it
    # (plus float32 rounding of 128 costs); and the 5 %.
    assert best - 1e-9 <= got <= best + spread / 100 + n * 1e-6
    assert got <= 1.05 * best


def test_integer_costs_reach_the_exact_optimum():
    # eps < 1 / n on integer costs: an eps-optimal assignment is optimal.
    cost = torch.randint(0, 20, (64, 64), generator=torch.Generator().manual_seed(1))
    target = balanced_assignment(cost)
    assert total(cost, target) == optimum(cost, torch.ones(64, dtype=torch.int64))


def test_default_capacity_is_met_exactly_on_rectangular_problems():
    generator = torch.Generator().manual_seed(2)
    cost = shared_preference(96, 8, generator)
    target = balanced_assignment(cost)  # ceil(96 / 8) = 12 per target, which the 96 objects must fill exactly
    assert torch.bincount(target, minlength=8).tolist() == [12] * 8
    best = optimum(cost, torch.full((8,), 12))
    assert best - 1e-9 <= total(cost, target) <= 1.05 * best


def test_per_target_capacities_with_spare_room_and_an_excluded_target():
    generator = torch.Generator().manual_seed(3)
    cost = shared_preference(50, 6, generator)
    capacity = torch.tensor([5, 0, 20, 10, 10, 15])  # 60 places for 50 objects; target 1 takes none
    target = balanced_assignment(cost, capacity)
    load = torch.bincount(target, minlength=6)
    assert (load <= capacity).all() and load[1] == 0
    best = optimum(cost, capacity)
    assert best - 1e-9 <= total(cost, target) <= 1.05 * best


def test_an_already_balanced_argmin_is_returned_unchanged():
    cost = torch.rand(40, 40, generator=torch.Generator().manual_seed(4)) + 10 * (1 - torch.eye(40))
    assert torch.equal(balanced_assignment(cost), torch.arange(40))


@pytest.mark.parametrize("rule", ["sign", "rms", "linear"])
def test_every_rule_ends_feasible_and_near_optimal(rule):
    generator = torch.Generator().manual_seed(5)
    cost = shared_preference(64, 16, generator)
    target = balanced_assignment(cost, update_rule=rule)
    assert torch.bincount(target, minlength=16).tolist() == [4] * 16
    assert total(cost, target) <= 1.05 * optimum(cost, torch.full((16,), 4))


def test_the_auction_alone_repairs_the_plain_argmin():
    cost = shared_preference(64, 64, torch.Generator().manual_seed(6))
    target = balanced_assignment(cost, max_iterations=0)
    assert torch.equal(target.sort().values, torch.arange(64))
    assert total(cost, target) <= 1.05 * optimum(cost, torch.ones(64, dtype=torch.int64))


def test_empty_and_single_target_problems():
    assert balanced_assignment(torch.zeros(0, 3)).shape == (0,)
    assert balanced_assignment(torch.rand(5, 1)).tolist() == [0] * 5


@pytest.mark.parametrize(
    "cost, capacity, options, message",
    [
        (torch.tensor([[0.0, math.nan], [1.0, 2.0]]), None, {}, r"finite, got 1 NaN or infinite entries \(of 4\)"),
        (torch.tensor([[0.0, math.inf], [1.0, 2.0]]), None, {}, r"finite, got 1 NaN"),
        (torch.rand(4), None, {}, r"shape \(n, m\) with m >= 1 targets, got shape \(4,\)"),
        (torch.rand(4, 0), None, {}, r"m >= 1 targets, got shape \(4, 0\)"),
        ([[0.0, 1.0]], None, {}, "must be a torch.Tensor of shape"),
        (torch.rand(4, 2), 1, {}, r"holds 2 objects in all, fewer than the n = 4 to assign"),
        (torch.rand(4, 2), [3, -1], {}, r"capacity must be >= 0 for every target, got -1"),
        (torch.rand(4, 2), [1, 2, 3], {}, r"shape \(2,\); got dtype torch.int64 and shape \(3,\)"),
        (torch.rand(4, 2), [1.5, 3.0], {}, r"one integer per target.*torch.float32"),
        (torch.rand(4, 2), None, {"update_rule": "adam"}, r"update_rule must be one of \('sign', 'rms', 'linear'\)"),
        (torch.rand(4, 2), None, {"max_iterations": -1}, r"max_iterations must be an int >= 0, got -1"),
        (torch.rand(4, 2), None, {"final_step": 0.0}, r"final_step must be a finite number > 0 .*got 0.0"),
        (torch.rand(4, 2), None, {"initial_step": math.nan}, r"initial_step must be a finite number > 0"),
    ],
)
def test_bad_input_is_a_clear_error(cost, capacity, options, message):
    with pytest.raises(ValueError, match=message):
        balanced_assignment(cost, capacity, **options)


def test_core_update_for_minimized_costs_and_wanted_loads():
    counts = torch.tensor([[6, 2, 0, 4]])  # mean load 3
    experts = torch.tensor([4])
    maximized = bias_update(counts, experts, "sign", 0.5)
    assert maximized.tolist() == [[-0.5, 0.5, 0.5, -0.5]]  # MoE: over-used down
    assert torch.equal(bias_update(counts, experts, "sign", 0.5, minimize=True), -maximized)  # argmin: over-used up
    wanted = torch.tensor([[6, 1, 1, 4]])  # loads at their wanted value do not move
    assert bias_update(counts, experts, "sign", 0.5, wanted=wanted, minimize=True).tolist() == [[0.0, 0.5, -0.5, 0.0]]
    linear = bias_update(counts, experts, "linear", 1.0, wanted=wanted)
    torch.testing.assert_close(linear, torch.tensor([[0.0, -1.0, 1.0, 0.0]]))  # (wanted - load) / wanted


@pytest.mark.parametrize("rule", ["sign", "rms", "linear"])
def test_core_update_is_the_same_for_an_int_width(rule):
    counts = torch.randint(0, 9, (5, 6), generator=torch.Generator().manual_seed(0))
    counts[3] = 0  # a row without objects does not move
    same = bias_update(counts, torch.full((5,), 6), rule, 0.25)
    assert torch.equal(bias_update(counts, 6, rule, 0.25), same) and same.dtype == torch.float32
    assert not same[3].any()
    if rule == "sign":  # the rule written out: u * sign(mean load - load)
        mean = counts.double().mean(dim=1, keepdim=True)
        assert torch.equal(same, (0.25 * torch.sign(mean - counts.double())).float())
    maxvio = max_violation(counts, 6)
    torch.testing.assert_close(maxvio, max_violation(counts, torch.full((5,), 6)), rtol=0, atol=0, equal_nan=True)
    mean = counts.double().mean(dim=1)
    expected = ((counts.double().amax(dim=1) - mean) / mean).float()  # (max - mean) / mean, NaN without objects
    torch.testing.assert_close(maxvio, expected, equal_nan=True)
    assert maxvio[3].isnan()
