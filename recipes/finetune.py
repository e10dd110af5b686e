#!/usr/bin/env python
"""Recipe 2: fine-tune any causal language model with any optimizer name.

The model is loaded with `AutoModelForCausalLM.from_pretrained` (the main job's output, any `lossfree_moe`, or any
other causal LM) together with its own tokenizer, trained with the `--optim` of your choice (`simba`, `lion`,
`signum`, `signsgd`, `signmomentum` or a transformers name such as `adamw_torch`) and evaluated before and after.
A model whose routers carry `e_score_correction_bias` keeps being balanced by `LossFreeBalanceCallback` (turn it
off with `--no_loss_free_balancing`) and also reports MaxVio_global. The output directory gets the weights, the
tokenizer, the Trainer's metrics, a loss plot and a model card naming the base model.

Usage:
    python recipes/finetune.py                                   # fine-tunes outputs/pretrain_moe
    python recipes/finetune.py --model_name_or_path DIR --optim lion --train_file my.txt --output_dir outputs/ft
    python recipes/finetune.py recipes/configs/finetune.json --optim signum --optim_args momentum=0.95
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipe_utils import (
    TRAINING_DEFAULTS,
    DataArguments,
    RunArguments,
    generate_sample,
    load_text,
    log_start,
    parse_arguments,
    perplexity,
    plot_curves,
    removed_on_failure,
    resolve_output_dir,
    series,
    setup_logging,
    tokenize_into_blocks,
    write_model_card,
)
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

import hf_signopt  # noqa: F401  (registers the optimizers and the lossfree_moe model type)
from hf_signopt import LossFreeBalanceCallback
from hf_signopt.moe.balancer import find_routers
from hf_signopt.run import end_processes

logger = logging.getLogger(__name__)

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
class ModelArguments:
    """The model to fine-tune."""

    model_name_or_path: str = field(
        default="outputs/pretrain_moe", metadata={"help": "Causal LM directory or hub name (default: the main job's)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "A tokenizer instead of the model's own."})
    loss_free_balancing: bool = field(
        default=True, metadata={"help": "Balance bias-routed experts with LossFreeBalanceCallback."}
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parses the arguments (`sys.argv[1:]` when `argv` is `None`) and fine-tunes."""
    model_args, data_args, training_args, run_args = parse_arguments(
        (ModelArguments, DataArguments, TrainingArguments, RunArguments), DEFAULTS, argv
    )
    setup_logging(training_args)
    with removed_on_failure(training_args.output_dir):
        return finetune(model_args, data_args, training_args, run_args)


def finetune(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
             run_args: RunArguments) -> dict[str, Any]:
    """Fine-tunes, evaluates before and after, writes the output directory; returns the eval metrics."""
    source = model_args.model_name_or_path
    if Path(source).resolve() == Path(training_args.output_dir).resolve():
        raise ValueError(f"--output_dir {training_args.output_dir!r} is the model being fine-tuned; choose another.")
    resume = resolve_output_dir(training_args, run_args)
    if source.startswith((".", "/")) or Path(source).exists():
        if not Path(source).is_dir():
            raise FileNotFoundError(f"--model_name_or_path {source!r} is not a model directory. Run "
                                    "`python recipes/pretrain_moe.py` first (it writes outputs/pretrain_moe).")
    on_hub = not Path(source).exists()
    base_model = source if on_hub else Path(source).resolve().name  # not a path that only this machine has

    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(resume or model_args.tokenizer_name or source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(resume or source)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and data_args.block_size > max_positions:
        raise ValueError(f"block_size={data_args.block_size} exceeds the model's max_position_embeddings="
                         f"{max_positions}; use --block_size in [2, {max_positions}].")
    blocks = tokenize_into_blocks(load_text(data_args), tokenizer, data_args, training_args)

    balance = LossFreeBalanceCallback() if model_args.loss_free_balancing and find_routers(model) else None
    trainer = Trainer(
        model=model, args=training_args, train_dataset=blocks["train"], eval_dataset=blocks["validation"],
        processing_class=tokenizer, data_collator=default_data_collator, callbacks=[balance] if balance else [],
    )
    before = trainer.evaluate(metric_key_prefix="before") if resume is None else {}

    log_start(training_args, model, data_args)
    train_result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    eval_metrics = trainer.evaluate()
    eval_metrics["perplexity"] = perplexity(eval_metrics["eval_loss"])
    if before:
        eval_metrics |= {"eval_loss_before": before["before_loss"],
                         "perplexity_before": perplexity(before["before_loss"])}
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    if not trainer.is_world_process_zero():
        return eval_metrics

    output_dir = trainer.args.output_dir
    plots = []
    if run_args.make_plots:
        history = trainer.state.log_history
        plot_curves({"train": series(history, "loss"), "eval": series(history, "eval_loss")},
                    f"{output_dir}/loss.png", title="Loss", ylabel="loss")
        plots = [("Training and evaluation loss", "loss.png")]
    card_metrics = {key: eval_metrics[key] for key in ("eval_loss_before", "eval_loss", "perplexity")
                    if key in eval_metrics}
    routing = None
    if balance is not None:
        config = model.config
        card_metrics["maxvio_global"] = eval_metrics["eval_moe/maxvio_global"]
        routing = {"balancing": "loss-free", "score_func": getattr(config, "router_score_func", "softmax"),
                   "update_rule": balance.balancer.update_rule, "update_rate": balance.balancer.update_rate,
                   "aux_loss_coef": getattr(config, "router_aux_loss_coef", 0.0),
                   "num_experts": len(balance.last_eval_metrics.tokens_per_expert[0]),
                   "top_k": config.num_experts_per_tok}
    write_model_card(trainer, recipe="finetune", dataset=data_args.label, metrics=card_metrics, routing=routing,
                     plots=plots, prompt=run_args.sample_prompt or "ROMEO:", base_model=base_model,
                     base_model_on_hub=on_hub)
    before_text = f"{eval_metrics['eval_loss_before']:.4f} -> " if before else ""
    logger.info("eval loss %s%.4f (perplexity %.2f); outputs in %s", before_text, eval_metrics["eval_loss"],
                eval_metrics["perplexity"], output_dir)
    if run_args.sample_prompt:
        sample = generate_sample(model, tokenizer, run_args.sample_prompt, run_args.sample_max_new_tokens,
                                 training_args.seed)
        print(f"\nSample:\n{sample}\n")
    return eval_metrics


if __name__ == "__main__":
    main()
    end_processes()
