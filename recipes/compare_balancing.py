#!/usr/bin/env python
"""Recipe 4: compare MoE load balancing: none, Mixtral's auxiliary loss, and loss-free (the router bias).

The main job's model, data, seed, optimizer and step budget are trained once per balancing mode, each run in
`<output_dir>/<mode>/` (checkpoints only if asked). On the validation split the recipe measures the eval loss
(language modelling only, without the auxiliary term) and MaxVio_global of every layer, prints and writes the
table (`comparison.md` / `comparison.json`), and draws every mode's per-expert load side by side
(`expert_load.png`).

Usage:
    python recipes/compare_balancing.py
    python recipes/compare_balancing.py --modes aux-loss loss-free --router_aux_loss_coef 0.01
    python recipes/compare_balancing.py --router_bias_update_rule rms --optim lion
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pretrain_moe
from recipe_utils import (
    comparison_runs,
    markdown_table,
    parse_arguments,
    plot_expert_load,
    removed_on_failure,
    setup_logging,
)

from hf_signopt.run import end_processes

DEFAULTS = {
    **pretrain_moe.DEFAULTS,
    "output_dir": "outputs/compare_balancing",
    "max_steps": 300,
    "eval_strategy": "no",  # one evaluation at the end
    "save_strategy": "no",
    "sample_prompt": "",
}
"""The main job's defaults, shorter, evaluated once, without checkpoints."""

COLUMNS = {
    "mode": "balancing",
    "aux_loss_coef": "aux loss coef",
    "eval_loss": "eval loss",
    "maxvio_global": "MaxVio_global (mean)",
    "maxvio_global_max": "MaxVio_global (worst layer)",
    "maxvio_per_layer": "MaxVio_global per layer",
}


@dataclasses.dataclass
class ComparisonArguments:
    """Which balancing modes to compare, in order."""

    modes: list[str] = dataclasses.field(
        default_factory=lambda: ["none", "aux-loss", "loss-free"],
        metadata={"help": f"Balancing modes to compare, from {pretrain_moe.BALANCING_MODES}."},
    )

    def __post_init__(self) -> None:
        modes = self.modes
        if not modes or len(set(modes)) != len(modes) or not set(modes) <= set(pretrain_moe.BALANCING_MODES):
            raise ValueError(f"modes must be distinct names from {pretrain_moe.BALANCING_MODES}, got {modes}.")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains once per mode, prints and writes the table, draws the expert loads; returns the rows."""
    comparison, model_args, data_args, training_args, run_args = parse_arguments(
        (ComparisonArguments, *pretrain_moe.ARGUMENTS), DEFAULTS, argv
    )
    setup_logging(training_args)
    runs = comparison_runs(training_args, run_args, {mode: {} for mode in comparison.modes})

    with removed_on_failure(training_args.output_dir):
        rows, loads = [], {}
        for mode, args in runs.items():
            with removed_on_failure(args.output_dir):
                mode_args = dataclasses.replace(model_args, balancing=mode)
                result = pretrain_moe.pretrain(mode_args, data_args, args, run_args)
            evaluation = result["eval"]
            rows.append({
                "mode": mode,
                "aux_loss_coef": model_args.router_aux_loss_coef if mode == "aux-loss" else 0.0,
                "eval_loss": evaluation["eval_loss"],
                "maxvio_global": evaluation["eval_moe/maxvio_global"],
                "maxvio_global_max": evaluation["eval_moe/maxvio_global_max"],
                "maxvio_per_layer": result["maxvio_per_layer"],
            })
            loads[mode] = result["tokens_per_expert"]

    table = markdown_table(rows, COLUMNS)
    output_dir = Path(training_args.output_dir)
    if training_args.process_index == 0:
        (output_dir / "comparison.md").write_text(table + "\n", encoding="utf-8")
        (output_dir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        if run_args.make_plots:
            plot_expert_load(loads, output_dir / "expert_load.png",
                             title="Per-expert load per layer on the validation split (load / mean load)")
        print(f"\nSame model, data, seed, optimizer and {training_args.max_steps} steps; results in {output_dir}:"
              f"\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
    end_processes()
