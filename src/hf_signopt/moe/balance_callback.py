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
        update_rate: Bias step size; default `model.config.router_bias_update_rate`, else 0.005.
        update_rule: `"sign"`, `"rms"` or `"linear"`; default `model.config.router_bias_update_rule`,
            else `"linear"`.

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
        self._updates_seen = 0  # balancer.steps_taken at the end of the last optimizer step
        self._eval_summary: dict[str, float] | None = None
        self.last_eval_metrics: LoadBalanceMetrics | None = None

    def _attach(self, model: nn.Module, create: bool = True) -> None:
        """Use the balancer the model has (its own, or another callback's), else make one if `create`."""
        previous = attached_balancer(model)
        if previous is not None and previous is self.balancer and previous.attached:
            return
        if previous is not None and (previous.follow_optimizer or previous in _CALLBACK_BALANCERS) and (
            previous.count_eval_tokens
        ):
            for argument, value in (("update_rate", self.update_rate), ("update_rule", self.update_rule)):
                if value is not None and value != getattr(previous, argument):
                    raise ValueError(
                        f"LossFreeBalanceCallback({argument}={value!r}) contradicts the balancer the model already "
                        f"has ({argument}={getattr(previous, argument)!r}); set only one of them"
                    )
            self.balancer = previous
        elif create:
            self.balancer = LossFreeBalancer(model, self.update_rate, self.update_rule, count_eval_tokens=True)
            _CALLBACK_BALANCERS.add(self.balancer)
            logger.info(
                f"LossFreeBalanceCallback: balancing {len(self.balancer.router_names)} routers "
                f"(rule={self.balancer.update_rule}, rate={self.balancer.update_rate})"
            )
        else:
            return
        self._updates_seen = self.balancer.steps_taken

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
        """One bias update per optimizer step, after all its micro-batches, unless the optimizer step already
        made it (a balancer that follows the optimizer, or another callback on the same balancer)."""
        if self.balancer is None:
            return
        if self.balancer.steps_taken == self._updates_seen:
            self.balancer.step()
        self._updates_seen = self.balancer.steps_taken
        # An evaluation that follows this step must not see eval-mode forwards made before it.
        self.balancer.reset_eval_counts()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs):
        """Add the MoE metrics to a training log (`loss` present) or an evaluation log."""
        if logs is None or self.balancer is None:
            return
        if "loss" in logs or "train_runtime" in logs:
            # A training log, or the final training summary: it reports the steps after the last training log.
            maxvio = self.balancer.pop_training_maxvio()
            if maxvio is None:  # none since the last log (or another callback on this balancer reported them)
                return
            added = self._summary(maxvio, "moe/maxvio", "moe/maxvio_max")
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


class TrainerBalanceCallback(LossFreeBalanceCallback):
    """In every `Trainer` once `hf_signopt` is imported (transformers' default callbacks): MoE metrics with no setup.

    For a model that balances itself (`lossfree_moe` with `router_bias_update_rate > 0`, or after
    `hf_signopt.enable_balancing(model)`) it logs the metrics `LossFreeBalanceCallback` logs, and makes the bias
    update at the end of an optimizer step where the optimizer step could not (DeepSpeed steps flat copies of the
    parameters). It also reports for a `LossFreeBalanceCallback` added by the user. It never creates a balancer:
    for a model whose routers carry a bias but that nothing balances it warns once at train begin; for other
    models it does nothing.
    """

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs.get("model")
        if model is not None and find_routers(model):
            self._attach(model, create=False)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        model = kwargs.get("model")
        if model is None or not find_routers(model):
            return
        self._attach(model, create=False)
        if self.balancer is None:
            logger.warning_once(
                f"{type(model).__name__} routes with an `e_score_correction_bias` but nothing balances it: call "
                "`hf_signopt.enable_balancing(model)` or add `LossFreeBalanceCallback()` to the Trainer's callbacks"
            )
        else:
            self.balancer.reset_eval_counts()


def register_trainer_balance_callback() -> None:
    """Add `TrainerBalanceCallback` to the callbacks every `transformers.Trainer` starts with (idempotent)."""
    from transformers import trainer

    if TrainerBalanceCallback not in trainer.DEFAULT_CALLBACKS:
        trainer.DEFAULT_CALLBACKS.append(TrainerBalanceCallback)
