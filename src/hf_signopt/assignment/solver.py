"""Balanced assignment by loss-free balancing: every object takes `argmin_j cost[i, j] + bias[j]`.

Seed 004 reads loss-free balancing as gradient descent on the dual of an assignment problem: choose each object's
cheapest target after adding a per-target bias, then move the bias up where a target is over-used and down where it
is under-used. `balanced_assignment` does that with the MoE balancer's own update (`bias_update`), then adds what the
iteration alone lacks to end feasible and near the optimum:

1. **The loss-free iteration**, with a step that decays geometrically (as epsilon-scaling does in auction algorithms)
   and biases kept >= 0 (the dual variables of `load <= capacity`). A feasible choice ends the solve: when the
   capacities sum to `n` it is optimal (Lagrangian sufficiency).
2. **A repair**: the argmin choice of near-optimal biases is ambiguous for the objects whose two cheapest targets
   nearly tie, so a few percent of them still conflict. A forward auction (Bertsekas) starts from the iteration's
   biases as prices and its choices as owners: every object left without a slot bids for its best target, raising the
   price by what makes it indifferent to its second best, plus `eps`; `eps` is scaled down to `final_step`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..bias_balancing import DEFAULT_UPDATE_RULE, bias_update, validate_update_rule

_STEP_DECAY = 0.01  # over all the loss-free iterations; the auction starts at the last step
_EPS_SCALING = 0.2  # per auction stage
_DEFAULT_INITIAL_FRACTION = 1 / 20  # of the cost spread
_DEFAULT_FINAL_FRACTION = 1 / 100  # of the cost spread, for all objects together: n * final_step
_MIN_STEP_ULPS = 64  # the smallest step, in units of the working dtype's resolution at the cost spread


def balanced_assignment(
    cost: torch.Tensor,
    capacity: int | Sequence[int] | torch.Tensor | None = None,
    *,
    max_iterations: int = 100,
    update_rule: str = DEFAULT_UPDATE_RULE,
    initial_step: float | None = None,
    final_step: float | None = None,
) -> torch.Tensor:
    """Assign each of `n` objects to one of `m` targets, at most `capacity[j]` objects per target, at a low total cost.

    Runs on `cost`'s device (one host synchronization per iteration or auction round). Costs are shifted by their row
    minimum first (which changes no assignment's ranking), so the steps are in units of the remaining spread `C`
    (the largest shifted cost). The result is always feasible. When the capacities sum to `n` (a square one-to-one
    problem, or `m` dividing `n` with the default capacity) it is within `n * final_step` of the optimum.

    Args:
        cost: Real `(n, m)` tensor, `cost[i, j]` the cost of giving object `i` to target `j`; finite.
        capacity: Objects each target may take: an int for every target, or one integer per target (0 excludes a
            target). Default `ceil(n / m)`.
        max_iterations: Loss-free iterations before the auction repair; 0 repairs from the plain argmin.
        update_rule: Bias update of the iteration, one of `("sign", "rms", "linear")` (see `bias_update`).
        initial_step: First bias step, in cost units; default `C / 20`.
        final_step: Last auction increment `eps`, in cost units; default `C / (100 * n)`. Raised to 64 resolution steps
            of the working dtype (float64 for float64 and integer costs, else float32) at `C` where smaller.

    Returns:
        `(n,)` int64 tensor on `cost`'s device: the target of every object.

    Raises:
        ValueError: If `cost` is not a finite real 2-D tensor with at least one column, a capacity is negative, the
            capacities hold fewer than `n` objects in all, or an option is out of range.

    Example:
        ```python
        cost = torch.rand(512, 512)
        target = balanced_assignment(cost)  # a permutation: one object per target
        total = cost[torch.arange(512), target].sum()
        ```
    """
    cost = _checked_cost(cost)
    n, m = cost.shape
    capacity = _checked_capacity(capacity, n, m, cost.device)
    update_rule = validate_update_rule(update_rule, "update_rule")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise ValueError(f"max_iterations must be an int >= 0, got {max_iterations!r}")
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=cost.device)
    usable = (capacity > 0).nonzero().squeeze(1)  # targets of capacity 0 can never be chosen: solve without them
    cost, capacity = cost[:, usable], capacity[usable]
    cost = cost - cost.min(dim=1, keepdim=True).values
    spread = cost.max().item() or 1.0  # all-equal rows: every feasible assignment is optimal, any scale will do
    smallest = _MIN_STEP_ULPS * torch.finfo(cost.dtype).eps * spread
    initial_step = _checked_step(initial_step, "initial_step", spread * _DEFAULT_INITIAL_FRACTION)
    final_step = max(_checked_step(final_step, "final_step", spread * _DEFAULT_FINAL_FRACTION / n), smallest)

    choice, bias, feasible = _loss_free_iteration(cost, capacity, update_rule, initial_step, max_iterations)
    if not feasible:
        auction = _Auction(cost, capacity, choice, bias)
        choice = auction.solve(max(initial_step * _STEP_DECAY, final_step), final_step)
    return usable[choice]


def _checked_cost(cost: torch.Tensor) -> torch.Tensor:
    if not isinstance(cost, torch.Tensor):
        raise ValueError(f"cost must be a torch.Tensor of shape (n, m), got {type(cost).__name__}")
    if cost.dim() != 2 or cost.shape[1] == 0:
        raise ValueError(f"cost must have shape (n, m) with m >= 1 targets, got shape {tuple(cost.shape)}")
    if cost.is_complex():
        raise ValueError(f"cost must be real, got dtype {cost.dtype}")
    working = torch.float64 if cost.dtype == torch.float64 or not cost.is_floating_point() else torch.float32
    cost = cost.to(working)
    bad = (~cost.isfinite()).sum().item()
    if bad:
        raise ValueError(f"cost must be finite, got {bad} NaN or infinite entries (of {cost.numel()})")
    return cost


def _checked_capacity(
    capacity: int | Sequence[int] | torch.Tensor | None, n: int, m: int, device: torch.device
) -> torch.Tensor:
    if capacity is None:
        capacity = math.ceil(n / m)
    if isinstance(capacity, bool):
        raise ValueError(f"capacity must be an int or {m} integers, got {capacity!r}")
    if isinstance(capacity, int):
        capacity = [capacity] * m
    capacity = torch.as_tensor(capacity, device=device)
    if capacity.shape != (m,) or capacity.is_floating_point() or capacity.is_complex() or capacity.dtype == torch.bool:
        raise ValueError(
            f"capacity must be an int or one integer per target, shape ({m},); got dtype {capacity.dtype} "
            f"and shape {tuple(capacity.shape)}"
        )
    capacity = capacity.to(torch.int64)
    lowest = capacity.min().item()
    if lowest < 0:
        raise ValueError(f"capacity must be >= 0 for every target, got {lowest}")
    capacity = capacity.clamp(max=n)  # no target needs more than n slots
    if capacity.sum().item() < n:
        raise ValueError(
            f"capacity holds {capacity.sum().item()} objects in all, fewer than the n = {n} to assign; "
            f"it must sum to at least {n}"
        )
    return capacity


def _checked_step(step: float | None, name: str, default: float) -> float:
    if step is None:
        return default
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (in cost units), got {step!r}")
    return float(step)


def _loss_free_iteration(
    cost: torch.Tensor, capacity: torch.Tensor, rule: str, step: float, max_iterations: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Seed 004's iteration: `choice = argmin(cost + bias)`, the bias moved by `bias_update(minimize=True)` toward
    loads at capacity, with a step decaying geometrically to `step * _STEP_DECAY`, and kept >= 0. Returns the last
    choice and bias, and whether that choice is feasible."""
    bias = torch.zeros(cost.shape[1], dtype=cost.dtype, device=cost.device)
    num_targets = torch.tensor([cost.shape[1]], device=cost.device)
    decay = _STEP_DECAY ** (1 / max(max_iterations, 1))
    for iteration in range(max_iterations + 1):
        choice = (cost + bias).argmin(dim=1)
        load = torch.bincount(choice, minlength=cost.shape[1])
        feasible = bool((load <= capacity).all())
        if feasible or iteration == max_iterations:
            break
        bias += bias_update(load[None], num_targets, rule, step, wanted=capacity[None], minimize=True)[0].to(bias)
        bias.clamp_(min=0)
        step *= decay
    return choice, bias, feasible


class _Auction:
    """Forward auction over slots (`capacity[j]` slots of target `j`, each with its own price), Jacobi style: all
    unassigned objects bid at once; each slot goes to its highest bidder, whose previous owner bids next round.

    Every owner stays within `eps` of its cheapest option (eps-complementary slackness), which bounds the total cost
    by the optimum plus `n * eps` once every object owns a slot and the capacities sum to `n`.
    """

    def __init__(self, cost: torch.Tensor, capacity: torch.Tensor, choice: torch.Tensor, bias: torch.Tensor) -> None:
        n, m = cost.shape
        device = cost.device
        self.cost, self.num_targets = cost, m
        self.slot_target = torch.repeat_interleave(torch.arange(m, device=device), capacity)
        self.price = bias[self.slot_target].clone()
        # Each target keeps, among the objects that chose it, the `capacity` that would lose most by moving.
        cheapest = (cost + bias).topk(2, dim=1, largest=False).values
        regret = cheapest[:, 1] - cheapest[:, 0]
        order = regret.argsort(descending=True, stable=True)
        order = order[choice[order].argsort(stable=True)]  # grouped by target, largest regret first
        target = choice[order]
        load = torch.bincount(choice, minlength=m)
        rank = torch.arange(n, device=device) - (load.cumsum(0) - load)[target]
        kept = rank < capacity[target]
        first_slot = capacity.cumsum(0) - capacity
        self.slot_of = torch.full((n,), -1, dtype=torch.int64, device=device)  # -1: no slot, bids
        self.slot_of[order[kept]] = first_slot[target[kept]] + rank[kept]
        self.owner = torch.full((self.slot_target.numel(),), -1, dtype=torch.int64, device=device)
        self.owner[self.slot_of[order[kept]]] = order[kept]

    def solve(self, eps: float, final_eps: float) -> torch.Tensor:
        """Bid until every object owns a slot, for `eps` scaled down to `final_eps`; the target of every object."""
        while True:
            self._bid_until_assigned(eps)
            if eps <= final_eps:
                return self.slot_target[self.slot_of]
            eps = max(eps * _EPS_SCALING, final_eps)
            self._release_unhappy(eps)

    def _cheapest_slots(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per target: the lowest slot price, a slot at that price, and the second lowest price (inf for one slot)."""
        m, slots = self.num_targets, self.price.numel()
        lowest = self.price.new_full((m,), math.inf).scatter_reduce(0, self.slot_target, self.price, "amin")
        index = torch.arange(slots, device=self.price.device)
        at_lowest = torch.where(self.price == lowest[self.slot_target], index, slots)
        slot = torch.full((m,), slots, device=index.device).scatter_reduce(0, self.slot_target, at_lowest, "amin")
        others = self.price.index_fill(0, slot, math.inf)
        second = self.price.new_full((m,), math.inf).scatter_reduce(0, self.slot_target, others, "amin")
        return lowest, slot, second

    def _bid_until_assigned(self, eps: float) -> None:
        n = self.slot_of.numel()
        while True:
            bidders = (self.slot_of < 0).nonzero().squeeze(1)
            if bidders.numel() == 0:
                return
            lowest, slot_at_lowest, second_lowest = self._cheapest_slots()
            values = self.cost[bidders] + lowest
            best = values.topk(2, dim=1, largest=False)
            target, value = best.indices[:, 0], best.values[:, 0]
            # The second best option: another target, or a second slot of the same target.
            runner_up = torch.minimum(best.values[:, 1], self.cost[bidders, target] + second_lowest[target])
            bid = lowest[target] + (runner_up - value) + eps
            slot = slot_at_lowest[target]
            highest = bid.new_full(self.price.shape, -math.inf).scatter_reduce(0, slot, bid, "amax")
            candidate = torch.where(bid == highest[slot], bidders, n)  # ties: the lowest object index wins
            winner = torch.full_like(self.owner, n).scatter_reduce(0, slot, candidate, "amin")
            won = (winner < n).nonzero().squeeze(1)
            outbid = self.owner[won]
            self.slot_of[outbid[outbid >= 0]] = -1
            self.owner[won] = winner[won]
            self.slot_of[winner[won]] = won
            self.price[won] = highest[won]

    def _release_unhappy(self, eps: float) -> None:
        """Free the slots of the owners more than `eps` above their cheapest option (they bid again)."""
        lowest = self._cheapest_slots()[0]
        best = (self.cost + lowest).min(dim=1).values
        rows = torch.arange(self.slot_of.numel(), device=self.cost.device)
        paid = self.cost[rows, self.slot_target[self.slot_of]] + self.price[self.slot_of]
        unhappy = paid > best + eps
        self.owner[self.slot_of[unhappy]] = -1
        self.slot_of[unhappy] = -1
