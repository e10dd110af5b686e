"""Simba: Lion with the momentum replaced by a window count of gradient signs (seed 001)."""

from collections.abc import Iterable
from typing import Any, Literal

import torch

from . import _functional as F
from ._base import SignOptimizer
from ._validation import check_choice, check_int_range, check_non_negative, check_unit_interval

MAX_WINDOW_SIZE = 32767


def sign_count_dtype(window_size: int) -> torch.dtype:
    """Smallest signed integer dtype holding ``+-window_size``: int8 up to 127, else int16."""
    return torch.int8 if window_size <= torch.iinfo(torch.int8).max else torch.int16


class Simba(SignOptimizer):
    r"""Simba: trust the sign history where it is decisive, else the current gradient sign.

    A per-element integer counter ``s`` in ``[-w, w]`` sums recent gradient signs. With
    ``k = int(window_size * threshold)`` and decoupled weight decay applied first::

        p <- p * (1 - lr * weight_decay)
        u  = sign(h) if |s| > k else sign(g)   # sign(0) = 0
        p <- p - lr * u
        m <- beta * m + (1 - beta) * g         # momentum="ema" only
        s <- clamp(s + sign(g), -w, w)

    ``momentum="counts"`` uses ``h = s`` and is exactly the reference code of the Simba post
    (seed 001), except that ``s`` saturates instead of wrapping at the dtype's limit.
    ``momentum="ema"`` is the post's "Simba + m_{t-1}" variant: ``h`` is the EMA ``m`` of the
    gradient (updated after the step), the threshold test still uses ``s``.

    State: ``sign_counts`` (``s``) in int8 for ``window_size <= 127``, else int16 (1 or 2 bytes
    per parameter); with ``"ema"`` also ``exp_avg`` (``m``) in the parameter's dtype.

    Args:
        params: Parameters or parameter-group dicts.
        lr: Learning rate, >= 0.
        window_size: Counter bound ``w``, an integer in [1, 32767].
        threshold: Fraction of the window ``|s|`` must exceed to trust the history, in [0, 1].
        weight_decay: Decoupled weight decay, >= 0.
        momentum: ``"counts"`` (sign of the counter) or ``"ema"`` (sign of a gradient EMA).
        beta: EMA coefficient in [0, 1) for ``momentum="ema"``.
        foreach: Use the batched torch path (True), the per-tensor torch path (False) or decide
            automatically (None).
        fused: Use the fused single-pass C++/OpenMP CPU kernel (True), never (False) or when it
            applies (None: CPU float32/bfloat16 parameters and a working compiler). On CUDA the
            default is the foreach path.
        nonfinite_check_interval: Every this many steps read the device-side count of skipped
            non-finite gradient elements and warn if it grew (0: only on `nonfinite_grad_count()`).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        window_size: int = 128,
        threshold: float = 0.1,
        weight_decay: float = 0.0,
        momentum: Literal["counts", "ema"] = "counts",
        beta: float = 0.99,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
        nonfinite_check_interval: int = 100,
    ) -> None:
        defaults = dict(lr=lr, window_size=window_size, threshold=threshold, weight_decay=weight_decay,
                        momentum=momentum, beta=beta, foreach=foreach, fused=fused)
        super().__init__(params, defaults, nonfinite_check_interval)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_non_negative("lr", group["lr"])
        check_int_range("window_size", group["window_size"], 1, MAX_WINDOW_SIZE)
        check_unit_interval("threshold", group["threshold"], include_one=True)
        check_non_negative("weight_decay", group["weight_decay"])
        check_choice("momentum", group["momentum"], ("counts", "ema"))
        check_unit_interval("beta", group["beta"])

    def _normalize_state(self, group: dict[str, Any]) -> None:
        window_size, counts_dtype = group["window_size"], sign_count_dtype(group["window_size"])
        for p in group["params"]:
            state = self.state[p]
            # Loaded (cast to float by torch) or edited (other window, ema switched on) state must fit.
            if state and state["sign_counts"].dtype != counts_dtype:
                counts = state["sign_counts"].to(torch.int32).clamp_(-window_size, window_size)
                state["sign_counts"] = counts.to(counts_dtype)
            if state and group["momentum"] == "ema" and "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _step_group(self, group: dict[str, Any]) -> None:
        window_size, ema = group["window_size"], group["momentum"] == "ema"
        counts_dtype = sign_count_dtype(window_size)

        def init(p: torch.Tensor) -> dict[str, torch.Tensor]:
            state = {"sign_counts": torch.zeros_like(p, dtype=counts_dtype, memory_format=torch.preserve_format)}
            if ema:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return state

        self._normalize_state(group)
        keys = ("sign_counts", "exp_avg") if ema else ("sign_counts",)
        for impl, params, grads, state_lists, count in self._buckets(group, init, keys):
            F.simba_step(params, grads, state_lists[0], state_lists[1] if ema else [], lr=group["lr"],
                         window_size=window_size, threshold=group["threshold"],
                         weight_decay=group["weight_decay"], beta=group["beta"], nonfinite_count=count, impl=impl)
