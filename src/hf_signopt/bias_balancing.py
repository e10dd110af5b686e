"""The bias-update core of loss-free balancing, shared by the MoE balancer, the assignment solver and the VQ layer.

Each of them chooses a target per object (an expert per token, a code per vector, a slot per job) by a score plus a
per-target bias that is used only for the choice, counts the objects every target received, and moves the bias toward
the wanted load: down for an over-used target where the biased scores are maximized (MoE routing, top-k), up where
biased costs are minimized (argmin: assignment, vector quantization). Seed 004 reads this as gradient descent on the
dual of an assignment problem.

Here live what does not depend on the model: the update rules and their validation, the count reduction across
ranks, the MaxVio statistic, the float32 bias, and `FollowsOptimizerSteps`, which updates a balancer after every
optimizer step (torch's global optimizer step post-hook).
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

UPDATE_RULES = ("sign", "rms", "linear")
DEFAULT_UPDATE_RATE = 1e-3
DEFAULT_UPDATE_RULE = "sign"

# Balancers updated after every optimizer step that holds their parameters: `id(balancer)` -> (a weak reference to
# it, its cache of those optimizers: optimizer -> (number of param groups, holds a followed parameter)). Weak both
# ways, so that it keeps nothing alive; a plain dict, which the hook after every optimizer step reads fastest.
_FOLLOWING: dict[int, tuple[weakref.ref, weakref.WeakKeyDictionary]] = {}
_optimizer_hook: torch.utils.hooks.RemovableHandle | None = None


def validate_update_rate(rate: Any, source: str = "update_rate") -> float:
    """Check a bias update rate and return it as a float.

    Args:
        rate: The step size `u` of the bias update.
        source: Name used in the error message.

    Raises:
        ValueError: If `rate` is not a finite real number >= 0.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate < 0:
        raise ValueError(f"{source} must be a finite number >= 0, got {rate!r}")
    return float(rate)


def validate_update_rule(rule: Any, source: str = "update_rule") -> str:
    """Check a bias update rule name and return it.

    Args:
        rule: One of `UPDATE_RULES`.
        source: Name used in the error message.

    Raises:
        ValueError: If `rule` is not a known rule name.
    """
    if rule not in UPDATE_RULES:
        raise ValueError(f"{source} must be one of {UPDATE_RULES}, got {rule!r}")
    return rule


def bias_update(
    counts: torch.Tensor,
    num_targets: torch.Tensor | int,
    rule: str,
    rate: float,
    *,
    wanted: torch.Tensor | None = None,
    minimize: bool = False,
) -> torch.Tensor:
    """Compute the bias increment of every row (an MoE layer, a codebook, a solver) from its target loads.

    Rows are padded to the widest row: entries at or beyond `num_targets[row]` must be 0. A row that saw no object
    does not move. With `load_i` the count of target `i`, `w_i` its wanted load (by default the mean load, an equal
    share) and `F`, `Q` the same as fractions of the row's total, the increment for a bias added to scores that are
    maximized is

    - `"sign"`: `u * sign(w_i - load_i)` (exactly 0 where the load is the wanted one);
    - `"rms"`: `u * (Q - F) / RMS(Q - F)` (0 when every load is the wanted one);
    - `"linear"`: `u * (w_i - load_i) / w_i`.

    With `minimize=True` the bias is added to costs that are minimized (`argmin(cost + bias)`), and the increment is
    the negation of that one: an over-used target's bias goes up.

    Args:
        counts: Integer objects per target, shape `(num_rows, max_targets)`.
        num_targets: Targets per row, integer tensor of shape `(num_rows,)`, or an int when every row has that
            many (no padding; the MoE balancer's common case, a few tensor operations fewer).
        rule: One of `UPDATE_RULES`.
        rate: Step size `u`.
        wanted: Wanted integer load per target, shaped like `counts` (positive for `"linear"`); None for equal loads.
        minimize: Whether the biased values are minimized rather than maximized.

    Returns:
        float32 tensor shaped like `counts`, zero in the padding.
    """
    total = counts.sum(dim=1, keepdim=True)
    padded = isinstance(num_targets, torch.Tensor)
    targets = num_targets.to(counts.device)[:, None] if padded else num_targets
    signed_rate = -rate if minimize else rate
    if rule != "rms" and wanted is None:  # the MoE case, in a few integer operations
        # E * (mean - load_i) = total - E * load_i, exact (one operation when every row has E targets)
        shortfall = total - targets * counts if padded else torch.sub(total, counts, alpha=targets)
        if rule == "sign":  # 0 where E * load_i = total, and in a row without objects (all zero)
            increment = torch.sign(shortfall).to(torch.float32).mul_(signed_rate)
        else:  # u * (mean - load_i) / mean = u * shortfall / total
            increment = (shortfall / total.clamp_min(1)).to(torch.float32).mul_(signed_rate)
        if padded:  # the padding's shortfall is the total: keep it at 0
            increment = increment.where(torch.arange(counts.shape[1], device=counts.device) < targets, 0.0)
        return increment
    valid = torch.arange(counts.shape[1], device=counts.device) < targets
    if rule == "sign":
        direction = torch.sign(wanted - counts).to(torch.float64)
    else:
        width = targets.to(torch.float64) if padded else targets
        fractions = counts.to(torch.float64) / total.clamp_min(1)
        wanted_fractions = 1.0 / width if wanted is None else wanted.to(torch.float64) / total.clamp_min(1)
        deviation = torch.where(valid, wanted_fractions - fractions, 0.0)
        if rule == "rms":
            rms = (deviation.square().sum(dim=1, keepdim=True) / width).sqrt()
            direction = deviation / rms.clamp_min(torch.finfo(torch.float64).tiny)
        else:  # linear, toward wanted loads
            direction = deviation / wanted_fractions
    direction = torch.where(valid & (total > 0), direction, 0.0)
    return (signed_rate * direction).to(torch.float32)


def max_violation(counts: torch.Tensor, num_targets: torch.Tensor | int) -> torch.Tensor:
    """MaxVio per row: `(max_i load_i - mean_load) / mean_load`; NaN for a row that saw no object.

    Args:
        counts: Integer objects per target, shape `(..., num_rows, max_targets)`, zero-padded (leading dimensions:
            several sets of rows at once, e.g. the counts of several updates).
        num_targets: Targets per row, shape `(num_rows,)`, or an int when every row has that many.

    Returns:
        float32 tensor of shape `counts.shape[:-1]`.
    """
    if isinstance(num_targets, torch.Tensor):
        num_targets = num_targets.to(counts.device)
    total = counts.sum(dim=-1)
    # (max * E - total) / total, with an exact integer numerator; true division (0 / 0 = NaN).
    return ((counts.amax(dim=-1) * num_targets - total) / total).to(torch.float32)


def all_reduce_counts(counts: torch.Tensor, process_group: dist.ProcessGroup | None = None) -> None:
    """Sum `counts` in place across the ranks of `process_group` (the default group when None); a no-op without
    an initialized process group of more than one rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=process_group)


class Float32Bias(nn.Module):
    """Mixed into modules whose selection bias is the buffer named `float32_bias_name`: the bias follows the module's
    device but stays float32 under `model.to(dtype)`, `.half()` and `.bfloat16()`."""

    float32_bias_name: str

    def _apply(self, fn, recurse=True):
        # `model.to(dtype)`, `.half()`, `.bfloat16()` all go through `_apply`: follow the device, keep float32
        # values bit for bit (a bf16 round trip would move the bias by up to 0.4%).
        bias = getattr(self, self.float32_bias_name)
        super()._apply(fn, recurse)
        moved = getattr(self, self.float32_bias_name)
        if moved.dtype != torch.float32:
            setattr(self, self.float32_bias_name, bias.to(device=moved.device))
        return self


class FollowsOptimizerSteps:
    """Base of the balancers that can update themselves after every optimizer step that trains their parameters.

    A subclass implements `step()` (one bias update from the counts since the previous one) and
    `_followed_parameters()`, sets `self._counted = True` whenever it counts training objects, and calls
    `_follow_optimizer_steps(True)` to be stepped by torch's global optimizer step post-hook: once per optimizer
    step however many optimizers step, only by an optimizer that holds one of its parameters, and only if objects were
    counted since its last update.
    """

    _counted = False  # training objects counted since the last update (a host-side flag, no sync)

    def step(self) -> Any:
        """Update the biases from the objects counted since the previous update."""
        raise NotImplementedError

    def _followed_parameters(self) -> Iterable[torch.Tensor]:
        """The parameters whose optimizer steps trigger `step()`."""
        raise NotImplementedError

    def _follow_optimizer_steps(self, follow: bool) -> None:
        """Start (`True`) or stop (`False`) updating after every optimizer step that trains the followed parameters."""
        global _optimizer_hook
        key = id(self)
        if not follow:
            _FOLLOWING.pop(key, None)
            return
        if _optimizer_hook is None:
            _optimizer_hook = register_optimizer_step_post_hook(_after_optimizer_step)
        if key not in _FOLLOWING:  # the entry leaves with the balancer (the callback holds the dict, not its name)
            forget = functools.partial(_forget_balancer, _FOLLOWING, key)
            _FOLLOWING[key] = (weakref.ref(self, forget), weakref.WeakKeyDictionary())

    def _is_trained_by(self, optimizer: torch.optim.Optimizer, cache: weakref.WeakKeyDictionary) -> bool:
        """Whether `optimizer` holds a followed parameter (cached per optimizer and number of param groups)."""
        cached = cache.get(optimizer)
        if cached is None or cached[0] != len(optimizer.param_groups):
            ours = {id(p) for p in self._followed_parameters()}
            held = any(id(p) in ours for group in optimizer.param_groups for p in group["params"])
            cached = (len(optimizer.param_groups), held)
            cache[optimizer] = cached
        return cached[1]


def _forget_balancer(registry: dict, key: int, reference: weakref.ref) -> None:
    """Weak-reference callback: drop a collected balancer's entry from `registry`, if it is still the one there."""
    if registry.get(key, (None,))[0] is reference:
        del registry[key]


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    """Global optimizer step post-hook: step every following balancer whose parameters this optimizer trains.

    Not inside a step compiled with `torch.compile` (dynamo would trace it into every compiled step): there the
    Trainer's callback makes the MoE update, and a plain loop calls `step()` after the compiled step.
    """
    if torch.compiler.is_compiling():
        return
    for reference, cache in list(_FOLLOWING.values()):
        balancer = reference()
        if balancer is not None and balancer._counted and balancer._is_trained_by(optimizer, cache):
            balancer.step()
