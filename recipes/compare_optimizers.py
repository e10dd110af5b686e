#!/usr/bin/env python
"""Recipe 3: compare AdamW and each sign optimizer on the main job's architecture, data, seed and step budget.

Each optimizer trains the main job's model (a small `lossfree_moe` with loss-free balancing) from scratch: the same
initial weights, the same blocks in the same order, each run in `<output_dir>/<optimizer>/` (weights and metrics;
checkpoints only if asked, e.g. `--save_strategy steps`). The recipe prints, and writes to `comparison.md` /
`comparison.json`, a table of final train and eval loss, step time, optimizer-state memory and MaxVio_global, and
draws every run's training loss in `loss_curves.png`. Each optimizer trains at its own `TUNED_SETTINGS` (learning rate,
weight decay and, for Simba, its `ema` variant), or all at `--learning_rate` and `--weight_decay` with
`--shared_settings`.

A sweep (`--sweep`, `--grid` or `--seeds`) trains each optimizer over a grid of settings, each with every seed,
in `<output_dir>/<optimizer>/<setting>/seed<seed>/`. `--grid "lion:learning_rate=1e-4,3e-4;weight_decay=0.1,1.0"`
gives one optimizer's grid (the product of its keys' values); a key is a `TrainingArguments` field (`adam_beta2`,
`warmup_steps`, ...), a `ModelArguments` field (`router_learning_rate_ratio`, ...) or, for hf_signopt's optimizers,
an `optim_args` key (`beta1`, `beta2`, `momentum`, `window_size`, `threshold`, ...). Under `--sweep` an optimizer
without a `--grid` takes its `DEFAULT_GRID` (4 learning rates x 2 weight decays); otherwise it runs once, at its
starting setting. `--max_steps` sets the run length. Every run is marked `diverged` (a non-finite loss, or a last logged
training loss above the first), `collapsed` (MaxVio_global above `--collapse_maxvio`, default 1.0) or `ok`.
`sweep.md` / `sweep.json` hold each optimizer's best setting (the lowest mean eval loss over the seeds among the
settings with no marked run), then every setting: seed means of eval and train loss, the eval loss's spread (max -
min) over the seeds, step time, optimizer-state memory, MaxVio_global and the marked runs; `eval_loss_vs_lr.png`
draws eval loss against learning rate, one panel per optimizer, the marked settings as red crosses.

How long a sweep takes on the 2-core development machine (one process, 2 threads): a run of the main job's model
costs about 0.34-0.40 s per step (0.34 quiet, README; 0.40 measured while shared, 30 steps) plus about 4 s of
tokenizer, evaluation and saving, so 200 steps are about 75-85 s. The default sweep, `--sweep` (6 optimizers x 8
settings, one seed, 200 steps), is 48 runs: 1 h to 1 h 10 min. Each further seed adds as much; at 500 steps it is
2 h 20 min to 2 h 45 min per seed, at 2000 steps 9 to 11 h per seed. The log gives the time left after every run.
A stopped sweep continues with the same flags plus `--resume_from_checkpoint last --overwrite_output_dir`: a
finished run (its `sweep_run.json` holds its row) is not trained again, an unfinished one is trained afresh (or from
its last checkpoint, with `--save_strategy steps`).

Usage:
    python recipes/compare_optimizers.py
    python recipes/compare_optimizers.py --optimizers adamw_torch lion simba --max_steps 100
    python recipes/compare_optimizers.py --optimizers adamw_torch simba --learning_rates 1e-3 5e-4
    python recipes/compare_optimizers.py --shared_settings --learning_rate 2e-3
    python recipes/compare_optimizers.py --sweep --output_dir outputs/sweep
    python recipes/compare_optimizers.py --optimizers adamw_torch lion --learning_rates 2e-3 3e-4 --seeds 0 1 2 \\
        --grid "lion:weight_decay=0.3,1.0,3.0;beta1=0.9,0.95;beta2=0.98,0.99" --max_steps 500
"""

import contextlib
import dataclasses
import inspect
import itertools
import json
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pretrain_moe
from recipe_utils import (
    DataArguments,
    RunArguments,
    comparison_runs,
    markdown_table,
    parse_arguments,
    plot_curves,
    plot_sweep,
    removed_on_failure,
    series,
    setup_logging,
)
from transformers import Trainer, TrainingArguments

from hf_signopt import SIGN_OPTIMIZERS
from hf_signopt.integrations import split_optim_args
from hf_signopt.run import end_processes

logger = logging.getLogger(__name__)

DEFAULTS = {
    **pretrain_moe.DEFAULTS,
    "output_dir": "outputs/compare_optimizers",
    "max_steps": 200,
    "eval_strategy": "no",  # one evaluation at the end; the step time is then the training step's alone
    "save_strategy": "no",
    "sample_prompt": "",
}
"""The main job's defaults, shorter, evaluated once, without checkpoints."""

DEFAULT_GRID = {
    "adamw_torch": {"learning_rate": [1e-3, 2e-3, 4e-3, 8e-3], "weight_decay": [0.1, 1.0]},
    **{name: {"learning_rate": [3e-4, 1e-3, 2e-3, 4e-3], "weight_decay": [0.1, 1.0]} for name in SIGN_OPTIMIZERS},
}
"""`--sweep`'s grid of each optimizer without a `--grid` of its own: 4 learning rates x 2 weight decays."""


def constructor_settings(optim: str) -> dict[str, Any]:
    """The learning rate and weight decay an hf_signopt optimizer's constructor defaults to."""
    parameters = inspect.signature(SIGN_OPTIMIZERS[optim][0]).parameters
    return {"learning_rate": parameters["lr"].default, "weight_decay": parameters["weight_decay"].default}


TUNED_SETTINGS: dict[str, dict[str, Any]] = {
    "adamw_torch": {"learning_rate": 2e-3, "weight_decay": 0.1},
    **{name: constructor_settings(name) for name in SIGN_OPTIMIZERS},
    "signsgd": {**constructor_settings("signsgd"), "learning_rate": 1e-3},
    "simba": {**constructor_settings("simba"), "momentum": "ema"},
}
"""Each optimizer's settings where the 500-step sweep of the main job found its lowest eval loss (README, "Choosing a
sign optimizer's settings": two rates per optimizer). hf_signopt's optimizers default to them, except signSGD
(Signum's class, whose rate is Signum's) and Simba's `ema` variant (4.42 against 4.68 with its sign counts, seed
42). A key is one a `--grid` takes. A comparison or sweep starts every optimizer from these, unless
`--shared_settings` gives them all `--learning_rate` and `--weight_decay` alone; `--learning_rates` overrides the
rates."""

COLLAPSE_MAXVIO = 1.0
"""A run whose MaxVio_global exceeds this is marked `collapsed`: on average over the layers, the busiest expert takes
more than twice its share. Balanced runs of the main job end near 0.1-0.3; collapsed ones in the issue near 1.2-2."""

COLUMNS = {
    "optimizer": "optimizer",
    "learning_rate": "lr",
    "weight_decay": "weight decay",
    "optim_args": "optim_args",
    "train_loss": "train loss (run mean)",
    "eval_loss": "eval loss",
    "step_seconds": "step time (s)",
    "step_time_vs_first": "step time / first row's",
    "state_mib": "optimizer state (MiB)",
    "state_bytes_per_param": "state bytes/param",
    "maxvio_global": "MaxVio_global",
}
SWEEP_COLUMNS = {
    "optimizer": "optimizer",
    "label": "setting",
    "seeds": "seeds",
    "eval_loss": "eval loss (seed mean)",
    "eval_loss_spread": "eval loss spread (max - min)",
    "train_loss": "train loss (run mean)",
    "step_seconds": "step time (s)",
    "state_mib": "optimizer state (MiB)",
    "state_bytes_per_param": "state bytes/param",
    "maxvio_global": "MaxVio_global",
    "status": "marked runs",
}
"""The sweep's tables: one row per setting, its metrics averaged over the seeds."""
AVERAGED = ("eval_loss", "train_loss", "step_seconds", "state_mib", "state_bytes_per_param", "maxvio_global")
"""The run metrics a setting reports as their mean over its seeds."""


@dataclasses.dataclass
class ComparisonArguments:
    """Which optimizers to compare, in order (the first is the step-time reference), and how to sweep them."""

    optimizers: list[str] = dataclasses.field(
        default_factory=lambda: ["adamw_torch", "lion", "signum", "signsgd", "signmomentum", "simba"],
        metadata={"help": "optim names to compare, in order."},
    )
    learning_rates: list[float] | None = dataclasses.field(
        default=None, metadata={"help": "One learning rate per optimizer (default: its TUNED_SETTINGS rate)."}
    )
    shared_settings: bool = dataclasses.field(
        default=False, metadata={"help": "Train every optimizer at --learning_rate and --weight_decay instead of its "
                                         "TUNED_SETTINGS."}
    )
    grid: list[str] | None = dataclasses.field(
        default=None, metadata={"help": "A sweep: one grid per optimizer, 'optim:key=v1,v2;key=v1,v2', e.g. "
                                        "'lion:learning_rate=1e-4,3e-4;weight_decay=0.1,1.0;beta2=0.98,0.99'."}
    )
    sweep: bool = dataclasses.field(
        default=False, metadata={"help": "A sweep: optimizers without a --grid take their DEFAULT_GRID."}
    )
    seeds: list[int] | None = dataclasses.field(
        default=None, metadata={"help": "A sweep: the seeds of every setting (default: --seed alone)."}
    )
    collapse_maxvio: float = dataclasses.field(
        default=COLLAPSE_MAXVIO, metadata={"help": "A sweep marks a run whose MaxVio_global exceeds this, > 0."}
    )
    grids: dict[str, dict[str, list[Any]]] = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.optimizers or len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"optimizers must name distinct optimizers, got {self.optimizers}.")
        if self.learning_rates is not None and len(self.learning_rates) != len(self.optimizers):
            raise ValueError(f"learning_rates has {len(self.learning_rates)} values for {len(self.optimizers)} "
                             f"optimizers {self.optimizers}; give one per optimizer.")
        self.grids = {}
        for optim, grid in map(parse_grid, self.grid or []):
            if optim not in self.optimizers or optim in self.grids:
                raise ValueError(f"--grid {optim}: each grid names one of --optimizers {self.optimizers}, once.")
            self.grids[optim] = grid
        if self.sweep and (missing := [o for o in self.optimizers if o not in self.grids and o not in DEFAULT_GRID]):
            raise ValueError(f"--sweep has no default grid for {missing} (it has one for {list(DEFAULT_GRID)}); "
                             "give theirs with --grid.")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}.")
        if not self.collapse_maxvio > 0:
            raise ValueError(f"collapse_maxvio must be > 0, got {self.collapse_maxvio}.")

    @property
    def is_sweep(self) -> bool:
        """Whether any sweep flag is given (otherwise one run per optimizer, as in a plain comparison)."""
        return self.sweep or self.grid is not None or self.seeds is not None


def parse_grid(spec: str) -> tuple[str, dict[str, list[Any]]]:
    """Parses one `--grid`: `"lion:learning_rate=1e-4,3e-4;momentum=ema"` ->
    `("lion", {"learning_rate": [0.0001, 0.0003], "momentum": ["ema"]})`; numbers become `int` or `float`."""
    optim, colon, body = spec.partition(":")
    if not colon or not optim.strip() or not body.strip():
        raise ValueError(f"--grid {spec!r} is not of the form 'optim:key=v1,v2;key=v1,...'.")
    grid = {}
    for entry in body.split(";"):
        key, equals, values = (part.strip() for part in entry.partition("="))
        texts = [text.strip() for text in values.split(",")]
        if not equals or not key or not all(texts):
            raise ValueError(f"--grid {spec!r}: {entry.strip()!r} is not of the form 'key=v1,v2,...'.")
        parsed = [grid_value(text) for text in texts]
        if key in grid or len(set(parsed)) != len(parsed):
            raise ValueError(f"--grid {spec!r}: give each key once, each of its values once ({key!r}).")
        grid[key] = parsed
    return optim.strip(), grid


def grid_value(text: str) -> int | float | str:
    """A grid value: an `int`, else a `float`, else the text itself (`"ema"`)."""
    for number in (int, float):
        with contextlib.suppress(ValueError):
            return number(text)
    return text


def setting_label(setting: Mapping[str, Any]) -> str:
    """`"learning_rate=0.001,weight_decay=0.1"`: a setting's name, in its tables and as its runs' directory."""
    return ",".join(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in setting.items())


def sweep_plan(grids: Mapping[str, Mapping[str, Sequence[Any]]], base: Mapping[str, Mapping[str, Any]],
               seeds: Sequence[int]) -> list[dict[str, Any]]:
    """Every run of a sweep: optimizer by optimizer, each point of its grid (an empty grid is one point), each seed.

    Args:
        grids: Per optimizer, the values of each swept key.
        base: Per optimizer, the settings it has where its grid does not set them (learning rate, weight decay).
        seeds: The seeds of every setting.

    Returns:
        Dicts with the `optimizer`, its `setting` (`base` updated by the grid point), the `seed` and the `run`'s
        directory under the output directory, `<optimizer>/<setting_label>/seed<seed>`.
    """
    plan = []
    for optim, grid in grids.items():
        for point in itertools.product(*grid.values()):
            setting = {**base[optim], **dict(zip(grid, point))}
            plan += [{"optimizer": optim, "setting": setting, "seed": seed,
                      "run": f"{optim}/{setting_label(setting)}/seed{seed}"} for seed in seeds]
    return plan


def run_arguments(run: Mapping[str, Any], optim_args: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Splits a planned run into `TrainingArguments` and `ModelArguments` changes.

    A setting's key names a `TrainingArguments` field (`learning_rate`, `adam_beta2`, `warmup_steps`, ...), a
    `ModelArguments` field (`router_learning_rate_ratio`, ...) or, for hf_signopt's optimizers, an `optim_args` key
    (`beta1`, `window_size`, `threshold`, `momentum`, ...), added to the shared `optim_args`.
    """
    training_fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    model_fields = {field.name for field in dataclasses.fields(pretrain_moe.ModelArguments)}
    training, model, entries = {"optim": run["optimizer"], "seed": run["seed"]}, {}, [optim_args]
    for key, value in run["setting"].items():
        if key in training_fields:
            training[key] = value
        elif key in model_fields:
            model[key] = value
        elif run["optimizer"] in SIGN_OPTIMIZERS:
            entries.append(f"{key}={value}")
        else:
            raise ValueError(f"--grid {run['optimizer']}: {key!r} is no TrainingArguments or ModelArguments field, "
                             f"and only hf_signopt's optimizers {list(SIGN_OPTIMIZERS)} take optim_args keys here.")
    return {**training, "optim_args": ",".join(filter(None, entries)) or None}, model


def planned_arguments(runs: Mapping[str, Mapping[str, Any]], model_args: pretrain_moe.ModelArguments,
                      training_args: TrainingArguments, run_args: RunArguments,
                      ) -> dict[str, tuple[TrainingArguments, pretrain_moe.ModelArguments]]:
    """Each planned run's `TrainingArguments` (in `<output_dir>/<name>/`, from `comparison_runs`) and
    `ModelArguments`, its setting applied by `run_arguments`, all built before anything trains."""
    changes = {name: run_arguments(run, training_args.optim_args) for name, run in runs.items()}
    training = comparison_runs(training_args, run_args, {name: change for name, (change, _) in changes.items()})
    return {name: (training[name], dataclasses.replace(model_args, **model)) for name, (_, model) in changes.items()}


def run_metrics(args: TrainingArguments, result: Mapping[str, Any]) -> dict[str, Any]:
    """A run's row from `pretrain_moe.pretrain`'s result: losses, step time, optimizer state and MaxVio_global."""
    train, evaluation = result["train"], result["eval"]
    return {
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "optim_args": args.optim_args or "",
        "train_loss": train["train_loss"],
        "eval_loss": evaluation["eval_loss"],
        "step_seconds": train["train_runtime"] / args.max_steps,
        "state_mib": train["optimizer_state_bytes"] / 2**20,
        "state_bytes_per_param": train["optimizer_state_bytes"] / train["num_parameters"],
        "maxvio_global": evaluation["eval_moe/maxvio_global"],
    }


def run_status(eval_loss: float, train_losses: Sequence[float], maxvio_global: float, collapse_maxvio: float) -> str:
    """`"diverged"` if the eval loss or a logged training loss is not finite, or if the last logged training loss
    is above the first (the run ended worse than it began); else `"collapsed"` if MaxVio_global exceeds
    `collapse_maxvio`; else `"ok"`."""
    if not all(map(math.isfinite, [eval_loss, *train_losses])) or train_losses and train_losses[-1] > train_losses[0]:
        return "diverged"
    return "collapsed" if maxvio_global > collapse_maxvio else "ok"


def summarize_settings(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per optimizer and setting, in the runs' order: the metrics' means over its seeds, the eval loss's
    spread (max - min; NaN if one is not finite) and its marked runs (`"ok"` if none)."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["optimizer"], setting_label(run["setting"])), []).append(run)
    rows = []
    for (optim, label), group in groups.items():
        losses = [run["eval_loss"] for run in group]
        marked = [f"{run['status']} (seed {run['seed']})" for run in group if run["status"] != "ok"]
        rows.append({
            "optimizer": optim, "label": label, "setting": group[0]["setting"], "seeds": len(group),
            **{key: statistics.fmean(run[key] for run in group) for key in AVERAGED},
            "eval_loss_spread": max(losses) - min(losses) if all(map(math.isfinite, losses)) else math.nan,
            "status": ", ".join(marked) or "ok",
        })
    return rows


def best_settings(settings: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Each optimizer's setting with the lowest mean eval loss among those with no marked run; an optimizer whose
    every setting has one keeps its lowest, marked as it is."""
    best: dict[str, Mapping[str, Any]] = {}

    def rank(row: Mapping[str, Any]) -> tuple[bool, float]:
        return row["status"] != "ok", row["eval_loss"] if math.isfinite(row["eval_loss"]) else math.inf

    for row in settings:
        if row["optimizer"] not in best or rank(row) < rank(best[row["optimizer"]]):
            best[row["optimizer"]] = row
    return list(best.values())


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]] | dict[str, Any]:
    """Parses the arguments, then compares (one run per optimizer) or sweeps; returns `compare`'s or `sweep`'s."""
    comparison, model_args, data_args, training_args, run_args = parse_arguments(
        (ComparisonArguments, *pretrain_moe.ARGUMENTS), DEFAULTS, argv
    )
    setup_logging(training_args)
    settings = starting_settings(comparison, training_args)
    if comparison.is_sweep:
        return sweep(comparison, settings, model_args, data_args, training_args, run_args)
    return compare(settings, model_args, data_args, training_args, run_args)


def starting_settings(comparison: ComparisonArguments, training_args: TrainingArguments) -> dict[str, dict[str, Any]]:
    """Each optimizer's settings before any grid: its `TUNED_SETTINGS` (the arguments' learning rate and weight decay
    for an optimizer without, or for all with `--shared_settings`) less the keys `--optim_args` gives, the rate
    replaced by its `--learning_rates` value."""
    shared = {"learning_rate": training_args.learning_rate, "weight_decay": training_args.weight_decay}
    tuned = {optim: shared if comparison.shared_settings else TUNED_SETTINGS.get(optim, shared)
             for optim in comparison.optimizers}
    given = split_optim_args(training_args.optim_args)
    settings = {optim: {key: value for key, value in setting.items() if key not in given}
                for optim, setting in tuned.items()}
    for optim, rate in zip(comparison.optimizers, comparison.learning_rates or []):
        settings[optim]["learning_rate"] = rate
    return settings


def compare(settings: Mapping[str, Mapping[str, Any]], model_args: pretrain_moe.ModelArguments,
            data_args: DataArguments, training_args: TrainingArguments, run_args: RunArguments) -> list[dict[str, Any]]:
    """Trains once per optimizer, prints and writes the table, draws the loss curves; returns the rows."""
    runs = planned_arguments({optim: {"optimizer": optim, "seed": training_args.seed, "setting": setting}
                              for optim, setting in settings.items()}, model_args, training_args, run_args)
    with removed_on_failure(training_args.output_dir):
        rows, curves = [], {}
        for optim, (args, run_model_args) in runs.items():
            with removed_on_failure(args.output_dir):
                result = pretrain_moe.pretrain(run_model_args, data_args, args, run_args)
            rows.append({"optimizer": optim, **run_metrics(args, result)})
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


FINISHED_RUN = "sweep_run.json"
"""Written into a sweep run's directory when it has finished: its row, so that a resumed sweep skips it."""


def sweep(comparison: ComparisonArguments, settings: Mapping[str, Mapping[str, Any]],
          model_args: pretrain_moe.ModelArguments, data_args: DataArguments, training_args: TrainingArguments,
          run_args: RunArguments) -> dict[str, Any]:
    """Trains every run of the sweep, writes `sweep.md`, `sweep.json` and `eval_loss_vs_lr.png`.

    Returns:
        What `sweep.json` holds: the `runs` (one row each), the `settings` (averaged over the seeds), the `best`
        setting of each optimizer and the `marks`' criteria.
    """
    grids = {optim: comparison.grids.get(optim, DEFAULT_GRID.get(optim, {}) if comparison.sweep else {})
             for optim in comparison.optimizers}
    seeds = comparison.seeds or [training_args.seed]
    plan = sweep_plan(grids, settings, seeds)
    runs = planned_arguments({run["run"]: run for run in plan}, model_args, training_args, run_args)
    for args, _ in runs.values():  # a bad optim_args key or value fails now, not after hours of training
        Trainer.get_optimizer_cls_and_kwargs(args)
    logger.info("Sweep: %d runs of %d steps (%d settings x %d seed(s)) into %s", len(plan), training_args.max_steps,
                len(plan) // len(seeds), len(seeds), training_args.output_dir)

    rows, started = [], time.monotonic()
    with removed_on_failure(training_args.output_dir):
        for index, run in enumerate(plan, 1):
            args, run_model_args = runs[run["run"]]
            finished = Path(args.output_dir) / FINISHED_RUN
            if training_args.resume_from_checkpoint == "last" and finished.is_file():
                rows.append(json.loads(finished.read_text(encoding="utf-8")))  # done before the sweep was stopped
                logger.info("Sweep run %d/%d %s: finished before, not trained again", index, len(plan), run["run"])
                continue
            with removed_on_failure(args.output_dir):
                result = pretrain_moe.pretrain(run_model_args, data_args, args, run_args)
            row = {**run, **run_metrics(args, result)}
            row["status"] = run_status(row["eval_loss"], series(result["log_history"], "loss")[1],
                                       row["maxvio_global"], comparison.collapse_maxvio)
            rows.append(row)
            if training_args.process_index == 0:
                finished.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
            elapsed = time.monotonic() - started
            logger.info("Sweep run %d/%d %s: eval loss %.4f, %s; about %.0f min left", index, len(plan), run["run"],
                        row["eval_loss"], row["status"], elapsed / index * (len(plan) - index) / 60)

    settings = summarize_settings(rows)
    best = best_settings(settings)
    marks = (f"Marked runs: *diverged* = a non-finite eval or training loss, or a last logged training loss above "
             f"the first; *collapsed* = MaxVio_global above {comparison.collapse_maxvio:g}.")
    report = {"runs": rows, "settings": settings, "best": best, "marks": marks}
    output_dir = Path(training_args.output_dir)
    if training_args.process_index == 0:
        text = (f"Sweep of {len(plan)} runs of {training_args.max_steps} steps, seeds {seeds}. Best setting per "
                f"optimizer (lowest mean eval loss among settings with no marked run):\n\n"
                f"{markdown_table(best, SWEEP_COLUMNS)}\n\n"
                f"Every setting:\n\n{markdown_table(settings, SWEEP_COLUMNS)}\n\n{marks}\n")
        (output_dir / "sweep.md").write_text(text, encoding="utf-8")
        (output_dir / "sweep.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if run_args.make_plots:
            panels: dict[str, dict[str, list]] = {}
            for row in settings:
                others = setting_label({k: v for k, v in row["setting"].items() if k != "learning_rate"})
                panels.setdefault(row["optimizer"], {}).setdefault(others or row["optimizer"], []).append(
                    (row["setting"]["learning_rate"], row["eval_loss"], row["status"] != "ok"))
            plot_sweep(panels, output_dir / "eval_loss_vs_lr.png", ylabel="eval loss (seed mean)",
                       xlabel="learning rate", title=f"Eval loss after {training_args.max_steps} steps (x: marked run)")
        print(f"\n{text}\nResults in {output_dir}\n")
    return report


if __name__ == "__main__":
    main()
    end_processes()
