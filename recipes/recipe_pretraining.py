"""One loss-free MoE pre-training run from arguments to a complete output directory.

Shared by `pretrain_moe.py` (the main job), `compare_optimizers.py` and `compare_balancing.py`.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import DatasetDict
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging

from hf_signopt.data import DataArguments, train_bpe_tokenizer
from hf_signopt.reporting import StepTimeCallback, optimizer_state_bytes, require_matplotlib
from recipe_arguments import RecipeArguments, resolve_resume_checkpoint
from recipe_lm import load_raw_datasets, optimizer_hyperparameters, optimizer_name, perplexity, prepare_lm_datasets
from recipe_moe import (
    MoeModelArguments,
    balancing_callbacks,
    build_moe_config,
    measure_expert_load,
    routing_summary,
    scale_router_learning_rate,
)
from recipe_outputs import training_summary, write_run_outputs


logger = logging.get_logger(__name__)


class MoeTrainer(Trainer):
    """`Trainer` whose optimizer runs the MoE routers at `router_learning_rate_ratio` x the learning rate."""

    def __init__(self, *args: Any, router_learning_rate_ratio: float = 1.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.router_learning_rate_ratio = router_learning_rate_ratio
        self._router_groups_made = False

    def create_optimizer(self, model: PreTrainedModel | None = None) -> Any:
        """Builds the optimizer as `Trainer` does, then gives the routers their own learning rate."""
        optimizer = super().create_optimizer(model)
        if not self._router_groups_made:
            scale_router_learning_rate(optimizer, self.model, self.router_learning_rate_ratio)
            self._router_groups_made = True
        return optimizer


@dataclass
class PretrainingRun:
    """What a pre-training run measured; its files are in `output_dir`.

    Attributes:
        output_dir: Directory with weights, config, tokenizer, metrics, plots and model card.
        final_metrics: `train_loss` (last logged), `eval_loss`, `perplexity`, `maxvio_global`,
            `step_seconds` (median), `optimizer_state_bytes`, `num_parameters`, `train_runtime`.
        expert_load: Per-layer expert loads on the evaluation set (`measure_expert_load`).
        log_history: The Trainer's log history.
        routing: Routing and balancing facts of the model (`routing_summary`).
    """

    output_dir: Path
    final_metrics: dict[str, Any]
    expert_load: dict[str, Any]
    log_history: list[dict[str, Any]]
    routing: dict[str, Any]


def obtain_tokenizer(
    model_args: MoeModelArguments, raw: DatasetDict, data_args: DataArguments, training_args: TrainingArguments,
    resume_checkpoint: str | None, block_size: int,
) -> PreTrainedTokenizerBase:
    """The run's tokenizer: the checkpoint's when resuming, `tokenizer_name`'s, or a BPE trained on train.

    A trained tokenizer is trained once, by the main process, and saved in `output_dir`; the other
    processes load that copy, so every rank has the same vocabulary.
    """
    if resume_checkpoint is not None:
        return AutoTokenizer.from_pretrained(resume_checkpoint)
    if model_args.tokenizer_name is not None:
        return AutoTokenizer.from_pretrained(model_args.tokenizer_name)
    with training_args.main_process_first(desc="training the tokenizer", local=False):
        if training_args.process_index == 0:
            tokenizer = train_bpe_tokenizer(
                raw["train"][data_args.text_column], vocab_size=model_args.tokenizer_vocab_size,
                model_max_length=block_size,
            )
            tokenizer.save_pretrained(training_args.output_dir)
        else:
            tokenizer = AutoTokenizer.from_pretrained(training_args.output_dir)
    return tokenizer


@contextlib.contextmanager
def language_modeling_loss_only(model: PreTrainedModel) -> Iterator[None]:
    """Evaluates without the auxiliary loss, so `eval_loss` compares across balancing modes."""
    saved = model.config.output_router_logits
    model.config.output_router_logits = False
    try:
        yield
    finally:
        model.config.output_router_logits = saved


def run_moe_pretraining(
    model_args: MoeModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    recipe_args: RecipeArguments,
    recipe: str = "pretrain_moe",
    raw: DatasetDict | None = None,
) -> PretrainingRun:
    """Pre-trains a `lossfree_moe` model and writes its complete output directory.

    Args:
        model_args: Model, tokenizer and balancing mode.
        data_args: Data and blocks.
        training_args: The Trainer's arguments (`optim`, steps, output directory, ...).
        recipe_args: Plots and sample options.
        recipe: Recipe name recorded in the model card.
        raw: Already loaded text splits (comparison recipes load once); loaded from `data_args` when
            `None`.

    Returns:
        The run's metrics.
    """
    if recipe_args.make_plots:
        require_matplotlib()  # fail before training, not after it
    output_dir = Path(training_args.output_dir)
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, str(output_dir))
    set_seed(training_args.seed)
    raw = raw if raw is not None else load_raw_datasets(data_args)
    tokenizer = obtain_tokenizer(model_args, raw, data_args, training_args, resume, data_args.block_size)
    blocks = prepare_lm_datasets(raw, data_args, tokenizer, training_args)
    set_seed(training_args.seed)  # the same initial weights whatever ran before
    if resume is None:
        config = build_moe_config(
            model_args, len(tokenizer), data_args.block_size,
            {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id},
        )
        model = AutoModelForCausalLM.from_config(config)
    else:
        # The checkpoint holds the run's own config (whatever flags built it); the Trainer then restores the
        # optimizer, scheduler, RNG and step.
        model = AutoModelForCausalLM.from_pretrained(resume)
    step_timer = StepTimeCallback()
    trainer = MoeTrainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[*balancing_callbacks(model_args.balancing), step_timer],
        router_learning_rate_ratio=model_args.router_learning_rate_ratio,
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    with language_modeling_loss_only(model):
        eval_metrics = trainer.evaluate()
    expert_load = measure_expert_load(model, trainer.get_eval_dataloader(), trainer.callback_handler.callbacks)
    train_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    final_metrics = {
        "train_loss": train_losses[-1] if train_losses else train_result.training_loss,
        "eval_loss": eval_metrics["eval_loss"],
        "perplexity": perplexity(eval_metrics["eval_loss"]),
        "maxvio_global": expert_load["maxvio_global"],
        "maxvio_global_max": max(expert_load["maxvio_per_layer"]),
        "step_seconds": step_timer.median_step_seconds,
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_runtime": train_result.metrics["train_runtime"],
        "global_step": trainer.state.global_step,
    }
    routing = routing_summary(model.config, model_args.balancing)
    if trainer.is_world_process_zero():
        write_run_outputs(
            output_dir,
            recipe=recipe,
            model=model,
            dataset_label=data_args.dataset_label,
            optimizer_name=optimizer_name(training_args),
            optimizer_hyperparameters=optimizer_hyperparameters(trainer.optimizer),
            final_metrics=final_metrics,
            log_history=trainer.state.log_history,
            training=training_summary(
                trainer, data_args.block_size, router_learning_rate_ratio=model_args.router_learning_rate_ratio
            ),
            routing=routing,
            expert_load=expert_load,
            make_plots=recipe_args.make_plots,
            prompt=recipe_args.sample_prompt or "ROMEO:",
        )
    return PretrainingRun(output_dir, final_metrics, expert_load, list(trainer.state.log_history), routing)
