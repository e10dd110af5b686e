#!/usr/bin/env python
"""Recipe 2: fine-tune any causal language model directory with any optimizer name.

The model is loaded with `AutoModelForCausalLM.from_pretrained` (the main job's output, any
`lossfree_moe` or other `Auto*` causal LM) together with its own tokenizer, trained with the Trainer
and the `--optim` of your choice (`simba`, `lion`, `signum`, `signsgd`, `signmomentum` or any
transformers name such as `adamw_torch`), and evaluated before and after: loss and perplexity on the
validation split. A model whose routers carry `e_score_correction_bias` keeps being balanced by
`LossFreeBalanceCallback` (turn off with `--no_loss_free_balancing`) and also reports MaxVio_global.
The output directory gets the weights, tokenizer, `metrics.json`, plots and a model card.

Usage:
    python recipes/finetune.py                                   # fine-tunes outputs/pretrain_moe
    python recipes/finetune.py --model_name_or_path DIR --optim lion --train_file my.txt
    python recipes/finetune.py recipes/configs/finetune.yaml --optim signum --optim_args momentum=0.95
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hf_signopt  # noqa: F401  (registers the optimizers and the lossfree_moe model type)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_signopt import LossFreeBalanceCallback
from hf_signopt.data import DataArguments
from hf_signopt.moe.balancer import find_routers
from hf_signopt.reporting import require_matplotlib
from recipe_arguments import TRAINING_DEFAULTS, RecipeArguments, parse_recipe_arguments, resolve_resume_checkpoint
from recipe_lm import (
    generate_sample,
    load_raw_datasets,
    optimizer_hyperparameters,
    optimizer_name,
    perplexity,
    prepare_lm_datasets,
)
from recipe_moe import measure_expert_load, routing_summary
from recipe_outputs import training_summary, write_run_outputs


DEFAULTS = {
    **TRAINING_DEFAULTS,
    "output_dir": "outputs/finetune",
    "optim": "simba",
    "learning_rate": 5e-4,
    "max_steps": 200,
    "eval_steps": 50,
    "save_steps": 100,
}
"""Training defaults of this recipe (a config file or flags override any of them)."""


@dataclass
class FinetuneModelArguments:
    """The model to fine-tune.

    Args:
        model_name_or_path: A causal LM directory (or hub name) that `AutoModelForCausalLM` loads;
            by default the main job's output.
        tokenizer_name: A tokenizer to use instead of the model's own.
        loss_free_balancing: Keep balancing the experts with `LossFreeBalanceCallback` when the model
            has routers with an `e_score_correction_bias` (ignored for other models).
    """

    model_name_or_path: str = field(
        default="outputs/pretrain_moe", metadata={"help": "Causal LM directory or hub name to fine-tune."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer instead of the model's own."})
    loss_free_balancing: bool = field(
        default=True, metadata={"help": "Balance bias-routed experts with LossFreeBalanceCallback."}
    )


def load_model_and_tokenizer(model_args: FinetuneModelArguments, checkpoint: str | None) -> tuple[Any, Any]:
    """Loads the model (from `checkpoint` when resuming) and its tokenizer, with clear errors."""
    source = checkpoint or model_args.model_name_or_path
    looks_local = Path(model_args.model_name_or_path).exists() or model_args.model_name_or_path.startswith((".", "/"))
    if looks_local and not Path(source).is_dir():
        raise FileNotFoundError(
            f"--model_name_or_path {model_args.model_name_or_path!r} is not a model directory. "
            "Run `python recipes/pretrain_moe.py` first (it writes outputs/pretrain_moe) or pass another directory."
        )
    tokenizer = AutoTokenizer.from_pretrained(checkpoint or model_args.tokenizer_name or model_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(source)
    return model, tokenizer


ARGUMENT_TYPES = (FinetuneModelArguments, DataArguments, TrainingArguments, RecipeArguments)
"""The dataclasses this recipe parses, in order."""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses arguments, fine-tunes, evaluates before and after, writes the outputs, prints a sample.

    Args:
        argv: Arguments after the script name (`sys.argv[1:]` when `None`).

    Returns:
        The final metrics.
    """
    model_args, data_args, training_args, recipe_args = parse_recipe_arguments(
        ARGUMENT_TYPES,
        DEFAULTS,
        sys.argv[1:] if argv is None else argv,
    )
    if recipe_args.make_plots:
        require_matplotlib()
    resume = resolve_resume_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    set_seed(training_args.seed)
    model, tokenizer = load_model_and_tokenizer(model_args, resume)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and data_args.block_size > max_positions:
        raise ValueError(
            f"block_size={data_args.block_size} exceeds the model's max_position_embeddings={max_positions}; "
            f"use --block_size in [2, {max_positions}]."
        )
    blocks = prepare_lm_datasets(load_raw_datasets(data_args), data_args, tokenizer, training_args)
    balanced = model_args.loss_free_balancing and bool(find_routers(model))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[LossFreeBalanceCallback()] if balanced else [],
    )
    before = trainer.evaluate(metric_key_prefix="before") if resume is None else None
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    after = trainer.evaluate()
    final = {
        "train_loss": train_result.training_loss,
        "eval_loss": after["eval_loss"],
        "perplexity": perplexity(after["eval_loss"]),
    }
    if before is not None:
        final |= {"eval_loss_before": before["before_loss"], "perplexity_before": perplexity(before["before_loss"])}
    expert_load = None
    if find_routers(model):
        expert_load = measure_expert_load(model, trainer.get_eval_dataloader(), trainer.callback_handler.callbacks)
        final |= {
            "maxvio_global": expert_load["maxvio_global"],
            "maxvio_global_max": max(expert_load["maxvio_per_layer"]),
        }
    final |= {"train_runtime": train_result.metrics["train_runtime"], "global_step": trainer.state.global_step}
    if trainer.is_world_process_zero():
        write_run_outputs(
            training_args.output_dir,
            recipe="finetune",
            model=model,
            dataset_label=data_args.dataset_label,
            optimizer_name=optimizer_name(training_args),
            optimizer_hyperparameters=optimizer_hyperparameters(trainer.optimizer),
            final_metrics=final,
            log_history=trainer.state.log_history,
            training=training_summary(trainer, data_args.block_size),
            routing=routing_summary(model.config, "loss-free" if balanced else "none"),
            expert_load=expert_load,
            make_plots=recipe_args.make_plots,
            base_model=model_args.model_name_or_path,
            prompt=recipe_args.sample_prompt or "ROMEO:",
        )
        before_text = (
            f"{final['eval_loss_before']:.4f} (perplexity {final['perplexity_before']:.2f}) -> " if before else ""
        )
        print(f"\nOutput directory: {training_args.output_dir}\n"
              f"eval loss {before_text}{final['eval_loss']:.4f} (perplexity {final['perplexity']:.2f})")
        if recipe_args.sample_prompt:
            sample = generate_sample(
                model, tokenizer, recipe_args.sample_prompt, recipe_args.sample_max_new_tokens, training_args.seed
            )
            print(f"\nSample:\n{sample}\n")
    return final


if __name__ == "__main__":
    main()
