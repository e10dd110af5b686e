"""Shared machinery of the sign optimizers: group validation, the step loop, non-finite reporting."""

from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers.utils import logging

from . import _functional as F
from ._validation import (
    check_grad,
    check_int_range,
    check_lr,
    check_non_negative,
    check_optional_bool,
    check_param,
    check_unit_interval,
)

logger = logging.get_logger(__name__)

DEFAULT_NONFINITE_CHECK_INTERVAL = 100

IMPLEMENTATION_ARGS_DOC = """
        foreach: Use the batched torch path (True), the per-tensor torch path (False) or decide
            automatically (None).
        fused: Use a fused single-pass kernel (True), never (False) or where one applies (None):
            the C++/OpenMP kernel for CPU float32/bfloat16 parameters (needs a C++ compiler), the
            Triton kernel for CUDA float32/bfloat16/float16 parameters (needs ``triton``).
            Elsewhere, and inside ``torch.compile``, the default is the foreach path.
        nonfinite_check_interval: Every this many steps read the device-side count of skipped
            non-finite gradient elements and warn if it grew (0: only on `nonfinite_grad_count()`;
            a step compiled with ``torch.compile`` leaves the reading to `nonfinite_grad_count()`).
"""


TUNED_DEFAULTS_DOC = """
    The defaults of ``lr`` and ``weight_decay`` are the best that a 500-step sweep found for pre-training a small
    MoE language model from scratch (README, "Choosing a sign optimizer's settings"): a starting point, not a
    universal value. Fine-tuning a pre-trained model wants a far smaller ``lr``, and a run that passes over its data
    many times a larger ``weight_decay``.
"""


def document_implementation_args(cls: type) -> type:
    """Append the implementation arguments shared by every sign optimizer to `cls`'s Args section, and the note on
    the tuned defaults."""
    sections = (cls.__doc__, IMPLEMENTATION_ARGS_DOC, TUNED_DEFAULTS_DOC)
    cls.__doc__ = "\n".join(section.rstrip() for section in sections) + "\n    "
    return cls


class SignOptimizer(torch.optim.Optimizer):
    """Base class: validates every parameter group and counts skipped non-finite gradient elements.

    Non-finite gradients: an element whose gradient is NaN or +-inf is skipped (its parameter and
    state stay exactly as they were) and counted in a per-device int64 tensor, without a
    host-device sync. The count is read (one sync) only every `nonfinite_check_interval` steps,
    where a warning is logged if it grew, and whenever `nonfinite_grad_count()` is called.

    Subclasses define `_validate_group(group)` and `_step_group(group)`, which, as in
    `torch/optim/adamw.py`, fills the tensor lists of the parameters that have a gradient with
    `_init_group(group, params, grads, *state_lists)` (creating state on first use; dynamo runs
    it eagerly when compiling a step) and makes one call of the algorithm's functional in
    `_functional`. `LATER_GROUP_DEFAULTS` holds the group keys added after the first release,
    filled in when an older state dict is loaded.
    """

    LATER_GROUP_DEFAULTS: dict[str, Any] = {"foreach": None, "fused": None}

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

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by load_state_dict: groups saved by an older version (or by another Lion
        # with the same state names) get the flags added since.
        super().__setstate__(state)
        self.__dict__.setdefault("nonfinite_check_interval", DEFAULT_NONFINITE_CHECK_INTERVAL)
        self.__dict__.setdefault("_nonfinite_counts", {})
        self.__dict__.setdefault("_nonfinite_reported", 0)
        self.__dict__.setdefault("_steps_taken", 0)
        for group in self.param_groups:
            for key, value in self.LATER_GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def _validate_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    def _normalize_state(self, group: dict[str, Any]) -> None:
        """Bring a group's loaded state to the dtypes its hyperparameters need (default: nothing)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load optimizer state, then re-validate the groups and restore the state dtypes.

        `torch.optim.Optimizer.load_state_dict` casts every state tensor of a floating-point
        parameter to the parameter's dtype; integer state (Simba's sign counts) is cast back here.
        Groups saved without a flag added later (``foreach``, ``fused``, ...) get its default.

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

    def _with_grad(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """Append the group's parameters that have a gradient, and the gradients.

        Also creates the non-finite counter of each of their devices, here rather than in the
        functional, so that a compiled step does not recompile once the counter exists.
        """
        for p in group["params"]:
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                if p.device not in self._nonfinite_counts:
                    self._nonfinite_counts[p.device] = F.new_nonfinite_counter(p.device)

    def _state_or_zeros(self, param: torch.Tensor, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The state tensor `key` of `param`, created as zeros shaped like it on first use."""
        state = self.state[param]
        if key not in state:
            state[key] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return state[key]

    def _implementation_flags(self, group: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments every functional takes besides the hyperparameters."""
        return dict(foreach=group["foreach"], fused=group["fused"], nonfinite_counts=self._nonfinite_counts)

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
        if not torch.compiler.is_compiling():  # a compiled step would recompile for each value of the count
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

    State: ``momentum_buffer`` per parameter, unless `_uses_buffers(group)` says otherwise.
    Subclasses document the arguments and set `_functional_step` to their functional in `_functional`;
    `extra_defaults` are further group keys of a subclass.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | torch.Tensor = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.1,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite_check_interval: int = DEFAULT_NONFINITE_CHECK_INTERVAL,
        **extra_defaults: Any,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=foreach, fused=fused,
                        **extra_defaults)
        super().__init__(params, defaults, nonfinite_check_interval)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        check_unit_interval("momentum", group["momentum"])
        check_non_negative("weight_decay", group["weight_decay"])

    def _uses_buffers(self, group: dict[str, Any]) -> bool:
        return True

    def _init_group(self, group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor],
                    momentum_buffers: list[torch.Tensor]) -> None:
        self._with_grad(group, params, grads)
        if self._uses_buffers(group):
            momentum_buffers.extend(self._state_or_zeros(p, "momentum_buffer") for p in params)

    def _step_group(self, group: dict[str, Any]) -> None:
        params, grads, momentum_buffers = [], [], []
        self._init_group(group, params, grads, momentum_buffers)
        if params:
            self._functional_step(params, grads, momentum_buffers, lr=group["lr"], momentum=group["momentum"],
                                  weight_decay=group["weight_decay"], **self._implementation_flags(group))
