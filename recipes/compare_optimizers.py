#!/usr/bin/env python
"""Recipe 3: compare AdamW and each sign optimizer on the same model, data, seed and step budget.

Each optimizer pre-trains the main job's model (a small `lossfree_moe` with loss-free balancing) from
the same initial weights on the same blocks in the same order. Every run gets its own complete output
directory (`<output_dir>/<optimizer>/`). The recipe prints, and writes to `comparison.md` / `.json`, a
table of final train and eval loss, median step time and optimizer-state memory, and draws the loss
curves of all runs in `loss_curves.png`.

Usage:
    python recipes/compare_optimizers.py
    python recipes/compare_optimizers.py --optimizers adamw_torch lion simba --max_steps 100
    python recipes/compare_optimizers.py --optimizers adamw_torch simba --learning_rates 1e-3 5e-4
"""

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hf_signopt  # noqa: F401  (registers the optimizers and the lossfree_moe model type)
from transformers import TrainingArguments

from hf_signopt.data import DataArguments
from hf_signopt.reporting import metric_series, plot_curves
from recipe_arguments import TRAINING_DEFAULTS, RecipeArguments, parse_recipe_arguments
from recipe_comparison import markdown_table, variant_resume, write_comparison
from recipe_lm import load_raw_datasets
from recipe_moe import MoeModelArguments
from recipe_pretraining import run_moe_pretraining


DEFAULT_OPTIMIZERS = ["adamw_torch", "lion", "signum", "signsgd", "signmomentum", "simba"]

DEFAULTS = {
    **TRAINING_DEFAULTS,
    "output_dir": "outputs/compare_optimizers",
    "learning_rate": 2e-3,
    "max_steps": 200,
    "eval_steps": 50,
    "save_steps": 100,
    "sample_prompt": "",
}
"""Training defaults of this recipe (a config file or flags override any of them)."""

COLUMNS = {
    "optimizer": "optimizer",
    "learning_rate": "lr",
    "train_loss": "final train loss",
    "eval_loss": "final eval loss",
    "step_seconds": "step time (s)",
    "step_time_vs_first": "step time / first",
    "state_mib": "optimizer state (MiB)",
    "state_bytes_per_param": "state bytes/param",
    "maxvio_global": "MaxVio_global",
}


@dataclass
class OptimizerComparisonArguments:
    """Which optimizers to compare.

    Args:
        optimizers: `TrainingArguments.optim` names, run in this order (the first is the reference of
            the step-time ratio). Default: `adamw_torch` and every sign optimizer.
        learning_rates: One learning rate per optimizer; all use `--learning_rate` when unset.
    """

    optimizers: list[str] = field(
        default_factory=lambda: list(DEFAULT_OPTIMIZERS), metadata={"help": "optim names to compare, in order."}
    )
    learning_rates: list[float] | None = field(default=None, metadata={"help": "One learning rate per optimizer."})

    def __post_init__(self) -> None:
        if not self.optimizers:
            raise ValueError("optimizers must name at least one optimizer.")
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"optimizers must not repeat a name, got {self.optimizers}.")
        if self.learning_rates is not None and len(self.learning_rates) != len(self.optimizers):
            raise ValueError(
                f"learning_rates has {len(self.learning_rates)} values for {len(self.optimizers)} optimizers "
                f"{self.optimizers}; give one per optimizer."
            )


def variant_arguments(training_args: TrainingArguments, optim: str, learning_rate: float) -> TrainingArguments:
    """The run's `TrainingArguments`: its own output subdirectory, optimizer and learning rate.

    Building them validates the optimizer name, so an unknown one fails before any training.
    """
    return dataclasses.replace(
        training_args,
        output_dir=str(Path(training_args.output_dir) / optim),
        optim=optim,
        learning_rate=learning_rate,
        resume_from_checkpoint=variant_resume(
            training_args.resume_from_checkpoint, Path(training_args.output_dir) / optim
        ),
    )


ARGUMENT_TYPES = (OptimizerComparisonArguments, MoeModelArguments, DataArguments, TrainingArguments, RecipeArguments)
"""The dataclasses this recipe parses, in order."""


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Runs every optimizer, prints and writes the table, draws the loss curves.

    Args:
        argv: Arguments after the script name (`sys.argv[1:]` when `None`).

    Returns:
        One row of results per optimizer.
    """
    comparison_args, model_args, data_args, training_args, recipe_args = parse_recipe_arguments(
        ARGUMENT_TYPES,
        DEFAULTS,
        sys.argv[1:] if argv is None else argv,
    )
    rates = comparison_args.learning_rates or [training_args.learning_rate] * len(comparison_args.optimizers)
    variants = [variant_arguments(training_args, optim, rate) for optim, rate in zip(comparison_args.optimizers, rates)]
    raw = load_raw_datasets(data_args)
    rows, curves = [], {}
    for optim, rate, args in zip(comparison_args.optimizers, rates, variants):
        run = run_moe_pretraining(model_args, data_args, args, recipe_args, recipe="compare_optimizers", raw=raw)
        metrics = run.final_metrics
        rows.append({
            "optimizer": optim,
            "learning_rate": rate,
            "train_loss": metrics["train_loss"],
            "eval_loss": metrics["eval_loss"],
            "step_seconds": metrics["step_seconds"],
            "state_mib": metrics["optimizer_state_bytes"] / 2**20,
            "state_bytes_per_param": metrics["optimizer_state_bytes"] / metrics["num_parameters"],
            "maxvio_global": metrics["maxvio_global"],
        })
        curves[f"{optim} train"] = metric_series(run.log_history, "loss")
    for row in rows:
        row["step_time_vs_first"] = row["step_seconds"] / rows[0]["step_seconds"]
    output_dir = Path(training_args.output_dir)
    table = markdown_table(rows, COLUMNS)
    if training_args.process_index == 0:
        write_comparison(output_dir, "comparison", table, rows)
        if recipe_args.make_plots:
            plot_curves(curves, output_dir / "loss_curves.png", title="Training loss by optimizer")
        print(f"\nSame model, data, seed and {training_args.max_steps} steps; results in {output_dir}:\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
