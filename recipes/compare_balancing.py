#!/usr/bin/env python
"""Recipe 4: compare MoE load balancing: none, Mixtral's auxiliary loss, and loss-free (router bias).

The same model (the main job's small `lossfree_moe`), data, seed, optimizer and step budget are
trained once per balancing mode, each in its own complete output directory
(`<output_dir>/<mode>/`). On the validation split the recipe measures eval loss (language-modeling
loss only, without the auxiliary term) and MaxVio_global of every layer, prints and writes the table
(`comparison.md` / `.json`), and draws the per-expert load of every layer for all modes side by side
(`expert_load.png`).

Usage:
    python recipes/compare_balancing.py
    python recipes/compare_balancing.py --modes aux-loss loss-free --router_aux_loss_coef 0.01
    python recipes/compare_balancing.py --router_bias_update_rule rms --optim lion
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
from hf_signopt.reporting import plot_expert_load
from recipe_arguments import TRAINING_DEFAULTS, RecipeArguments, parse_recipe_arguments
from recipe_comparison import markdown_table, variant_resume, write_comparison
from recipe_lm import load_raw_datasets
from recipe_moe import BALANCING_MODES, MoeModelArguments
from recipe_pretraining import run_moe_pretraining


DEFAULTS = {
    **TRAINING_DEFAULTS,
    "output_dir": "outputs/compare_balancing",
    "optim": "simba",
    "learning_rate": 2e-3,
    "max_steps": 300,
    "eval_steps": 100,
    "save_steps": 150,
    "sample_prompt": "",
}
"""Training defaults of this recipe (a config file or flags override any of them)."""

COLUMNS = {
    "mode": "balancing",
    "aux_loss_coef": "aux loss coef",
    "eval_loss": "eval loss",
    "maxvio_global": "MaxVio_global (mean)",
    "maxvio_global_max": "MaxVio_global (worst layer)",
    "maxvio_per_layer": "MaxVio_global per layer",
}


@dataclass
class BalancingComparisonArguments:
    """Which balancing modes to compare.

    Args:
        modes: Balancing modes, from `none`, `aux-loss` and `loss-free`, run in this order.
    """

    modes: list[str] = field(default_factory=lambda: list(BALANCING_MODES[::-1]), metadata={
        "help": f"Balancing modes to compare, from {BALANCING_MODES}."})

    def __post_init__(self) -> None:
        unknown = [mode for mode in self.modes if mode not in BALANCING_MODES]
        if not self.modes or unknown or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct names from {BALANCING_MODES}, got {self.modes}.")


ARGUMENT_TYPES = (BalancingComparisonArguments, MoeModelArguments, DataArguments, TrainingArguments, RecipeArguments)
"""The dataclasses this recipe parses, in order."""


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains once per mode, prints and writes the table, draws the expert loads.

    Args:
        argv: Arguments after the script name (`sys.argv[1:]` when `None`).

    Returns:
        One row of results per mode.
    """
    comparison_args, model_args, data_args, training_args, recipe_args = parse_recipe_arguments(
        ARGUMENT_TYPES,
        DEFAULTS,
        sys.argv[1:] if argv is None else argv,
    )
    output_dir = Path(training_args.output_dir)
    variants = []
    for mode in comparison_args.modes:
        coef = model_args.router_aux_loss_coef if mode == "aux-loss" else None
        variants.append((
            mode,
            dataclasses.replace(model_args, balancing=mode, router_aux_loss_coef=coef),
            dataclasses.replace(
                training_args, output_dir=str(output_dir / mode),
                resume_from_checkpoint=variant_resume(training_args.resume_from_checkpoint, output_dir / mode),
            ),
        ))
    raw = load_raw_datasets(data_args)
    rows, loads = [], {}
    for mode, mode_model_args, mode_training_args in variants:
        run = run_moe_pretraining(
            mode_model_args, data_args, mode_training_args, recipe_args, recipe="compare_balancing", raw=raw
        )
        rows.append({
            "mode": mode,
            "aux_loss_coef": run.routing["aux_loss_coef"],
            "eval_loss": run.final_metrics["eval_loss"],
            "maxvio_global": run.final_metrics["maxvio_global"],
            "maxvio_global_max": run.final_metrics["maxvio_global_max"],
            "maxvio_per_layer": run.expert_load["maxvio_per_layer"],
        })
        loads[mode] = run.expert_load["tokens_per_expert"]
    table = markdown_table(rows, COLUMNS)
    if training_args.process_index == 0:
        write_comparison(output_dir, "comparison", table, rows)
        if recipe_args.make_plots:
            plot_expert_load(loads, output_dir / "expert_load.png",
                             title="Per-expert load per layer on the validation split (load / mean load)")
        print(f"\nSame model, data, seed, optimizer and {training_args.max_steps} steps; results in {output_dir}:"
              f"\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
