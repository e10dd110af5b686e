#!/usr/bin/env python
"""Recipe 1, the main job: pre-train a loss-free balanced Mixture-of-Experts language model.

By default a small `lossfree_moe` model (4 layers x 8 experts, top-2) is trained from scratch with the
Simba optimizer and `LossFreeBalanceCallback` on the shipped Tiny Shakespeare corpus, with a byte-level
BPE tokenizer trained on the training split, in a few minutes on a laptop CPU. The output directory
then holds `model.safetensors` (router biases included), `config.json`, the tokenizer, `metrics.json`,
PNG plots and a model card `README.md`; it loads back with `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` (after `import hf_signopt`). The run ends by printing a generated sample.

Usage:
    python recipes/pretrain_moe.py                                  # the default run
    python recipes/pretrain_moe.py --max_steps 20 --output_dir /tmp/smoke
    python recipes/pretrain_moe.py recipes/configs/pretrain_moe.yaml --train_file my.txt
    python recipes/pretrain_moe.py --resume_from_checkpoint last    # continue an interrupted run
    accelerate launch --config_file recipes/accelerate/ddp_cpu.yaml recipes/pretrain_moe.py --use_cpu true
"""

import sys
from collections.abc import Sequence

import hf_signopt  # noqa: F401  (registers the optimizers and the lossfree_moe model type)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hf_signopt.data import DataArguments
from recipe_arguments import TRAINING_DEFAULTS, RecipeArguments, parse_recipe_arguments
from recipe_lm import generate_sample
from recipe_moe import MoeModelArguments
from recipe_pretraining import PretrainingRun, run_moe_pretraining


DEFAULTS = {
    **TRAINING_DEFAULTS,
    "output_dir": "outputs/pretrain_moe",
    "optim": "simba",
    "learning_rate": 2e-3,
    "max_steps": 500,
    "eval_steps": 100,
    "save_steps": 250,
}
"""Training defaults of this recipe (a config file or flags override any of them)."""


ARGUMENT_TYPES = (MoeModelArguments, DataArguments, TrainingArguments, RecipeArguments)
"""The dataclasses this recipe parses, in order."""


def main(argv: Sequence[str] | None = None) -> PretrainingRun:
    """Parses arguments, pre-trains, prints the results and a generated sample.

    Args:
        argv: Arguments after the script name (`sys.argv[1:]` when `None`).

    Returns:
        The run's metrics.
    """
    model_args, data_args, training_args, recipe_args = parse_recipe_arguments(
        ARGUMENT_TYPES,
        DEFAULTS,
        sys.argv[1:] if argv is None else argv,
    )
    run = run_moe_pretraining(model_args, data_args, training_args, recipe_args)
    if training_args.process_index == 0:
        metrics = run.final_metrics
        print(
            f"\nOutput directory: {run.output_dir}\n"
            f"eval loss {metrics['eval_loss']:.4f} (perplexity {metrics['perplexity']:.2f}), "
            f"MaxVio_global {metrics['maxvio_global']:.4f} (worst layer {metrics['maxvio_global_max']:.4f})"
        )
        if recipe_args.sample_prompt:
            # Load back what was saved: the sample comes from the output directory, not from memory.
            tokenizer = AutoTokenizer.from_pretrained(run.output_dir)
            model = AutoModelForCausalLM.from_pretrained(run.output_dir)
            sample = generate_sample(
                model, tokenizer, recipe_args.sample_prompt, recipe_args.sample_max_new_tokens, training_args.seed
            )
            print(f"\nSample from the saved model:\n{sample}\n")
    return run


if __name__ == "__main__":
    main()
