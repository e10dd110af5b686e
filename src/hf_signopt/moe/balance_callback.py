"""`transformers.Trainer` callback that runs the loss-free MoE load balancing once per optimizer step."""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from .balancer import (
    LoadBalanceMetrics,
    LossFreeBalancer,
    attached_balancer,
    find_routers,
    maxvio_summary,
    validate_update_rate,
    validate_update_rule,
)

logger = logging.get_logger(__name__)

# Balancers made by callbacks: a new callback on the same model (a Trainer built again) takes them over.
_CALLBACK_BALANCERS: weakref.WeakSet[LossFreeBalancer] = weakref.WeakSet()


class LossFreeBalanceCallback(TrainerCallback):
    """Balances the experts of a MoE model without an auxiliary loss, inside `transformers.Trainer`.

    At train begin it attaches a `LossFreeBalancer` to the model. After every optimizer step (once all
    gradient-accumulation micro-batches are done) it updates each router's `e_score_correction_bias`
    from the tokens routed during that step, summed over all data-parallel ranks. Evaluation and
    prediction never move the bias. The bias is a model buffer, so checkpoints save it and resuming
    restores it.

    Metrics:
        - with each training log, and with the final training summary for the steps after the last log:
          `moe/maxvio` (MaxVio averaged over the optimizer steps since the last log, then over layers) and
          `moe/maxvio_max` (the same, worst layer);
        - with each evaluation: `{prefix}_moe/maxvio_global` (MaxVio of the loads summed over the whole
          evaluation run, averaged over layers) and `{prefix}_moe/maxvio_global_max` (worst layer).

        A router that saw no token (MaxVio NaN) is left out of the mean and the worst layer, with one warning;
        the figures are never NaN.

    The loads behind the last evaluation's figures stay in `last_eval_metrics` (a `LoadBalanceMetrics`, with
    the tokens each expert of each layer received).

    Reporting integrations registered before this callback (`report_to`) get the Trainer's logs first;
    the metrics are always in `trainer.state.log_history`, in the dict `evaluate()` returns, and in what
    later callbacks see.

    Args:
        update_rate: Bias step size; default `model.config.router_bias_update_rate`, else 0.001.
        update_rule: `"sign"`, `"rms"` or `"linear"`; default `model.config.router_bias_update_rule`,
            else `"sign"`.

    Example:
        ```python
        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[LossFreeBalanceCallback()])
        trainer.train()
        ```
    """

    def __init__(self, update_rate: float | None = None, update_rule: str | None = None) -> None:
        self.update_rate = None if update_rate is None else validate_update_rate(update_rate, "update_rate")
        self.update_rule = None if update_rule is None else validate_update_rule(update_rule, "update_rule")
        self.balancer: LossFreeBalancer | None = None
        self._maxvio_sum: torch.Tensor | None = None  # per layer, over the steps since the last log
        self._routed_steps: torch.Tensor | None = None  # per layer, the steps in which it routed tokens
        self._eval_summary: dict[str, float] | None = None
        self.last_eval_metrics: LoadBalanceMetrics | None = None

    def _attach(self, model: nn.Module) -> None:
        if self.balancer is not None and self.balancer.model is model:
            return
        if self.balancer is not None:
            self.balancer.remove()
        previous = attached_balancer(model)
        if previous is not None and previous in _CALLBACK_BALANCERS:
            logger.warning("LossFreeBalanceCallback: taking over from the LossFreeBalanceCallback attached before")
            previous.remove()
        self.balancer = LossFreeBalancer(model, self.update_rate, self.update_rule, count_eval_tokens=True)
        _CALLBACK_BALANCERS.add(self.balancer)
        self._maxvio_sum = self._routed_steps = None
        logger.info(
            f"LossFreeBalanceCallback: balancing {len(self.balancer.router_names)} routers "
            f"(rule={self.balancer.update_rule}, rate={self.balancer.update_rate})"
        )

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Attach early when possible, so that `trainer.evaluate()` before any training reports MaxVio."""
        model = kwargs.get("model")
        if model is not None and find_routers(model):
            self._attach(model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """Attach to the model being trained; raise if it has no router to balance."""
        model = kwargs.get("model")
        if model is None:
            raise ValueError("LossFreeBalanceCallback needs the Trainer to pass the model to its callbacks")
        if not find_routers(model):
            raise ValueError(
                f"LossFreeBalanceCallback: {type(model).__name__} has no MoE router with an "
                "`e_score_correction_bias` buffer. Use a loss-free MoE model such as `LossFreeMoeForCausalLM` "
                "(or DeepSeek-V3 / GLM-4-MoE), or remove the callback."
            )
        self._attach(model)
        self.balancer.reset_eval_counts()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        """One bias update per optimizer step, after all its micro-batches."""
        metrics = self.balancer.step()
        if self._maxvio_sum is None:
            self._maxvio_sum, self._routed_steps = torch.zeros_like(metrics.maxvio), torch.zeros_like(metrics.maxvio)
        self._maxvio_sum += metrics.maxvio.nan_to_num(0.0)
        self._routed_steps += ~metrics.maxvio.isnan()
        # An evaluation that follows this step must not see eval-mode forwards made before it.
        self.balancer.reset_eval_counts()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        """Add the MoE metrics to a training log (`loss` present) or an evaluation log."""
        if logs is None or self.balancer is None:
            return
        if ("loss" in logs or "train_runtime" in logs) and self._maxvio_sum is not None:
            # A training log, or the final training summary: it reports the steps after the last training log.
            added = self._summary(self._maxvio_sum / self._routed_steps, "moe/maxvio", "moe/maxvio_max")
            self._maxvio_sum = self._routed_steps = None
        else:
            prefix = _evaluation_prefix(logs)
            if prefix is None:
                return
            added = self._evaluation_summary(prefix)
        logs.update(added)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(added)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kwargs
    ):
        """Put MaxVio_global of the evaluation run into its metrics, then forget its counts."""
        if self.balancer is None:
            return
        if metrics is not None:
            prefix = _evaluation_prefix(metrics) or "eval"
            for key, value in self._evaluation_summary(prefix).items():
                metrics.setdefault(key, value)
        self._eval_summary = None
        self.balancer.reset_eval_counts()

    def on_predict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kwargs):
        """Prediction runs are not reported; forget their counts."""
        if self.balancer is not None:
            self.balancer.reset_eval_counts()

    def _evaluation_summary(self, prefix: str) -> dict[str, float]:
        # Computed once per evaluation (it is a collective: every rank reaches on_log and on_evaluate).
        if self._eval_summary is None:
            self.last_eval_metrics = self.balancer.eval_metrics(reset=False)
            self._eval_summary = self._summary(
                self.last_eval_metrics.maxvio, f"{prefix}_moe/maxvio_global", f"{prefix}_moe/maxvio_global_max"
            )
        return self._eval_summary

    @staticmethod
    def _summary(per_layer: torch.Tensor, mean_key: str, max_key: str) -> dict[str, float]:
        summary = maxvio_summary(per_layer)
        return {} if summary is None else {mean_key: summary[0], max_key: summary[1]}


def _evaluation_prefix(metrics: dict) -> str | None:
    """The `metric_key_prefix` of an evaluation's metrics (`eval_runtime` -> `eval`), None otherwise."""
    for key in metrics:
        if key.endswith("_runtime") and not key.startswith("train"):
            return key[: -len("_runtime")]
    return None
