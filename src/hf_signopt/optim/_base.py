"""Shared machinery of the sign optimizers: group validation, state buckets, non-finite reporting."""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from transformers.utils import logging

from . import _functional as F
from ._validation import (
    check_grad,
    check_int_range,
    check_non_negative,
    check_optional_bool,
    check_param,
    check_unit_interval,
)

logger = logging.get_logger(__name__)


class SignOptimizer(torch.optim.Optimizer):
    """Base class: validates every parameter group and counts skipped non-finite gradient elements.

    Non-finite gradients: an element whose gradient is NaN or +-inf is skipped (its parameter and
    state stay exactly as they were) and counted in a per-device int64 tensor, without a
    host-device sync. The count is read (one sync) only every `nonfinite_check_interval` steps,
    where a warning is logged if it grew, and whenever `nonfinite_grad_count()` is called.

    Subclasses define `_validate_group(group)` and `_step_group(group)`.
    """

    def __init__(self, params: Any, defaults: dict[str, Any], nonfinite_check_interval: int) -> None:
        check_int_range("nonfinite_check_interval", nonfinite_check_interval, 0, 2**31 - 1)
        self._validate_group(defaults)
        self.nonfinite_check_interval = nonfinite_check_interval
        self._nonfinite_counts: dict[torch.device, torch.Tensor] = {}
        self._nonfinite_reported = 0
        self._steps_taken = 0
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles only defaults, state and param_groups; keep our attributes too.
        state = super().__getstate__()
        state.update(
            nonfinite_check_interval=self.nonfinite_check_interval,
            _nonfinite_counts=self._nonfinite_counts,
            _nonfinite_reported=self._nonfinite_reported,
            _steps_taken=self._steps_taken,
        )
        return state

    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _normalize_state(self, group: dict[str, Any]) -> None:
        """Bring a group's existing state to the dtypes its hyperparameters need (default: nothing)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state, then re-validate the groups and restore the state dtypes.

        `torch.optim.Optimizer.load_state_dict` casts every state tensor of a floating-point
        parameter to the parameter's dtype; integer state (Simba's sign counts) is cast back here.

        Args:
            state_dict: A dict returned by `state_dict()`.
        """
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._validate_group(group)
            self._normalize_state(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after checking its parameters and hyperparameters.

        Args:
            param_group: Parameters (``"params"``) and hyperparameter overrides.

        Raises:
            ValueError: A sparse, complex or non-float parameter, or an out-of-range hyperparameter.
            TypeError: A hyperparameter of the wrong type.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group)
        check_optional_bool("foreach", group["foreach"])
        check_optional_bool("fused", group["fused"])
        if group["foreach"] and group["fused"]:
            raise ValueError("foreach=True and fused=True are mutually exclusive; set at most one")
        for param in group["params"]:
            check_param(param)
            if group["fused"]:
                F.check_fused_supported(param)

    def _counter(self, device: torch.device) -> torch.Tensor:
        if device not in self._nonfinite_counts:
            self._nonfinite_counts[device] = F.new_nonfinite_counter(device)
        return self._nonfinite_counts[device]

    def _buckets(
        self, group: dict[str, Any], init_state: Callable[[torch.Tensor], dict[str, torch.Tensor]],
        state_keys: tuple[str, ...],
    ) -> Iterator[tuple[str, list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]], torch.Tensor]]:
        """Yield ``(impl, params, grads, state_lists, nonfinite_count)`` per (device, dtype) bucket.

        Parameters without a gradient are skipped; state is created on first use by `init_state`.
        """
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for param in group["params"]:
            if param.grad is None:
                continue
            state = self.state[param]
            if not state:
                state.update(init_state(param))
            buckets.setdefault((param.device, param.dtype), []).append(param)
        for (device, _), params in buckets.items():
            grads = [p.grad for p in params]
            state_lists = [[self.state[p][key] for p in params] for key in state_keys]
            impl = F.select_impl(
                [*params, *grads, *(t for lst in state_lists for t in lst)], group["foreach"], group["fused"]
            )
            yield impl, params, grads, state_lists, self._counter(device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The loss returned by `closure`, if given.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # check every gradient before changing any parameter
            for param in group["params"]:
                if param.grad is not None:
                    check_grad(param.grad)
        for group in self.param_groups:
            self._step_group(group)
        self._steps_taken += 1
        if self.nonfinite_check_interval and self._steps_taken % self.nonfinite_check_interval == 0:
            self._report_nonfinite()
        return loss

    def nonfinite_grad_count(self) -> int:
        """Return how many non-finite gradient elements were skipped so far (synchronises devices).

        Returns:
            Total number of gradient elements that were NaN or +-inf, over all steps and devices
            since this optimizer was created.
        """
        return sum(int(count.item()) for count in self._nonfinite_counts.values())

    def _report_nonfinite(self) -> None:
        total = self.nonfinite_grad_count()
        if total > self._nonfinite_reported:
            logger.warning(
                f"{type(self).__name__}: skipped {total - self._nonfinite_reported} non-finite gradient "
                f"element(s) in the last {self.nonfinite_check_interval} step(s) ({total} in total); "
                "their parameters and optimizer state were left unchanged"
            )
            self._nonfinite_reported = total


class MomentumSignOptimizer(SignOptimizer):
    """Base of the optimizers whose hyperparameters are `lr`, `momentum` and `weight_decay` (Signum, SignMomentum).

    Subclasses document the arguments and define `_step_group(group)`.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite_check_interval: int = 100,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach, fused=fused)
        super().__init__(params, defaults, nonfinite_check_interval)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_non_negative("lr", group["lr"])
        check_unit_interval("momentum", group["momentum"])
        check_non_negative("weight_decay", group["weight_decay"])
