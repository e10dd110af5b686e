#!/usr/bin/env python
"""Recipe 3: compare AdamW and each sign optimizer on the main job's architecture, data, seed and step budget.

Each optimizer trains the main job's model (a small `lossfree_moe` with loss-free balancing) from scratch: the same
initial weights, the same blocks in the same order, each run in `<output_dir>/<optimizer>/` (weights and metrics;
checkpoints only if asked, e.g. `--save_strategy steps`). The recipe prints, and writes to `comparison.md` /
`comparison.json`, a table of final train and eval loss, step time, optimizer-state memory and MaxVio_global, and
draws every run's training loss in `loss_curves.png`.

Usage:
    python recipes/compare_optimizers.py
    python recipes/compare_optimizers.py --optimizers adamw_torch lion simba --max_steps 100
    python recipes/compare_optimizers.py --optimizers adamw_torch simba --learning_rates 1e-3 5e-4
"""

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pretrain_moe
from recipe_utils import (
    comparison_runs,
    end_processes,
    markdown_table,
    parse_arguments,
    plot_curves,
    removed_on_failure,
    series,
    setup_logging,
)

DEFAULTS = {
    **pretrain_moe.DEFAULTS,
    "output_dir": "outputs/compare_optimizers",
    "max_steps": 200,
    "eval_strategy": "no",  # one evaluation at the end; the step time is then the training step's alone
    "save_strategy": "no",
    "sample_prompt": "",
}
"""The main job's defaults, shorter, evaluated once, without checkpoints."""

COLUMNS = {
    "optimizer": "optimizer",
    "learning_rate": "lr",
    "train_loss": "train loss (run mean)",
    "eval_loss": "eval loss",
    "step_seconds": "step time (s)",
    "step_time_vs_first": "step time / first row's",
    "state_mib": "optimizer state (MiB)",
    "state_bytes_per_param": "state bytes/param",
    "maxvio_global": "MaxVio_global",
}


@dataclasses.dataclass
class ComparisonArguments:
    """Which optimizers to compare, in order (the first is the step-time reference)."""

    optimizers: list[str] = dataclasses.field(
        default_factory=lambda: ["adamw_torch", "lion", "signum", "signsgd", "signmomentum", "simba"],
        metadata={"help": "optim names to compare, in order."},
    )
    learning_rates: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "One learning rate per optimizer (default: --learning_rate for all)."}
    )

    def __post_init__(self) -> None:
        if not self.optimizers or len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"optimizers must name distinct optimizers, got {self.optimizers}.")
        if self.learning_rates is not None and len(self.learning_rates) != len(self.optimizers):
            raise ValueError(f"learning_rates has {len(self.learning_rates)} values for {len(self.optimizers)} "
                             f"optimizers {self.optimizers}; give one per optimizer.")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Trains once per optimizer, prints and writes the table, draws the loss curves; returns the rows."""
    comparison, model_args, data_args, training_args, run_args = parse_arguments(
        (ComparisonArguments, *pretrain_moe.ARGUMENTS), DEFAULTS, argv
    )
    setup_logging(training_args)
    rates = comparison.learning_rates or [training_args.learning_rate] * len(comparison.optimizers)
    runs = comparison_runs(training_args, run_args, {
        optim: {"optim": optim, "learning_rate": rate} for optim, rate in zip(comparison.optimizers, rates)
    })

    with removed_on_failure(training_args.output_dir):
        rows, curves = [], {}
        for optim, args in runs.items():
            with removed_on_failure(args.output_dir):
                result = pretrain_moe.pretrain(model_args, data_args, args, run_args)
            train, evaluation = result["train"], result["eval"]
            rows.append({
                "optimizer": optim,
                "learning_rate": args.learning_rate,
                "train_loss": train["train_loss"],
                "eval_loss": evaluation["eval_loss"],
                "step_seconds": train["train_runtime"] / args.max_steps,
                "state_mib": train["optimizer_state_bytes"] / 2**20,
                "state_bytes_per_param": train["optimizer_state_bytes"] / train["num_parameters"],
                "maxvio_global": evaluation["eval_moe/maxvio_global"],
            })
            curves[optim] = series(result["log_history"], "loss")
        for row in rows:
            row["step_time_vs_first"] = row["step_seconds"] / rows[0]["step_seconds"]

    table = markdown_table(rows, COLUMNS)
    output_dir = Path(training_args.output_dir)
    if training_args.process_index == 0:
        (output_dir / "comparison.md").write_text(table + "\n", encoding="utf-8")
        (output_dir / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        if run_args.make_plots:
            plot_curves(curves, output_dir / "loss_curves.png", title="Training loss by optimizer", ylabel="loss")
        print(f"\nSame model, data, seed and {training_args.max_steps} steps; results in {output_dir}:\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
    end_processes()
