"""Measurements the comparison recipes report: optimizer-state memory and training step time."""

import statistics
import time

import torch
from transformers import TrainerCallback


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors in an optimizer's per-parameter state (moments, counters, steps).

    Args:
        optimizer: A torch optimizer, or accelerate's wrapper around one.

    Returns:
        The total size in bytes of every tensor in `optimizer.state`.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        value.numel() * value.element_size()
        for state in inner.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


class StepTimeCallback(TrainerCallback):
    """Records the wall time between consecutive optimizer steps of a `Trainer` run.

    The time from one `on_step_end` to the next covers data loading, forward, backward and the
    optimizer step; intervals that contain an evaluation or a checkpoint save are dropped. No device
    synchronization is added: on an accelerator the queue of pending work bounds how far the host runs
    ahead, so the median over many steps still measures throughput.

    Attributes:
        intervals: Seconds between consecutive steps of the last training run.
    """

    def __init__(self) -> None:
        self.intervals: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        """Starts a new series."""
        self.intervals = []
        self._last = None

    def on_step_end(self, args, state, control, **kwargs):
        """Adds the time since the previous step."""
        now = time.perf_counter()
        if self._last is not None:
            self.intervals.append(now - self._last)
        self._last = now

    def on_evaluate(self, args, state, control, **kwargs):
        """An evaluation is not part of a step: restart the clock after it."""
        self._last = None

    def on_save(self, args, state, control, **kwargs):
        """Nor is writing a checkpoint."""
        self._last = None

    @property
    def median_step_seconds(self) -> float:
        """Median seconds per optimizer step (NaN before two steps were seen)."""
        return statistics.median(self.intervals) if self.intervals else float("nan")
