"""Everything a recipe writes beside the weights: metrics file, plots and model card."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers.utils import logging

from hf_signopt.reporting import metric_series, plot_curves, plot_expert_load, render_model_card, write_metrics_file


logger = logging.get_logger(__name__)

MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_cards" / "causal_lm.md"
"""The model-card template in the project's `model_cards/` folder."""

LOSS_PLOT, MAXVIO_PLOT, LOAD_PLOT = "loss.png", "maxvio.png", "expert_load.png"


def write_run_plots(
    output_dir: Path, log_history: Sequence[Mapping[str, Any]], expert_load: Mapping[str, Any] | None
) -> list[tuple[str, str]]:
    """Writes the loss curves, the MaxVio curve (when logged) and the expert-load heat map (for an MoE).

    Returns:
        `(caption, file name)` of each plot written, for the model card.
    """
    plots = []
    curves = {"train loss": metric_series(log_history, "loss"), "eval loss": metric_series(log_history, "eval_loss")}
    plot_curves(curves, output_dir / LOSS_PLOT, title="Loss")
    plots.append(("Training and evaluation loss", LOSS_PLOT))
    maxvio = metric_series(log_history, "moe/maxvio")
    if maxvio[0]:
        plot_curves(
            {"MaxVio (mean over layers)": maxvio, "MaxVio (worst layer)": metric_series(log_history, "moe/maxvio_max")},
            output_dir / MAXVIO_PLOT, title="Expert load violation during training", ylabel="MaxVio",
        )
        plots.append(("MaxVio of the training batches", MAXVIO_PLOT))
    if expert_load is not None:
        plot_expert_load({"evaluation set": expert_load["tokens_per_expert"]}, output_dir / LOAD_PLOT)
        plots.append(("Per-expert load per layer on the evaluation set", LOAD_PLOT))
    return plots


def training_summary(trainer: Any, block_size: int, **extra: Any) -> dict[str, Any]:
    """The training settings a model card states: steps, batch, processes, block size, lr schedule, seed.

    Args:
        trainer: The `Trainer` that ran (its `args` and `state` are read).
        block_size: Tokens per training block.
        **extra: Recipe-specific settings, inserted after the learning rate.
    """
    args = trainer.args
    return {
        "max_steps": trainer.state.max_steps,
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "block_size": block_size,
        "learning_rate": args.learning_rate,
        **extra,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "weight_decay": args.weight_decay,
        "seed": args.seed,
    }


def write_run_outputs(
    output_dir: str | Path,
    *,
    recipe: str,
    model: Any,
    dataset_label: str,
    optimizer_name: str,
    optimizer_hyperparameters: Mapping[str, Any],
    final_metrics: Mapping[str, Any],
    log_history: Sequence[Mapping[str, Any]],
    training: Mapping[str, Any],
    routing: Mapping[str, Any] | None,
    expert_load: Mapping[str, Any] | None,
    make_plots: bool,
    base_model: str | None = None,
    prompt: str = "ROMEO:",
) -> None:
    """Writes `metrics.json`, the plots and the model card `README.md` into `output_dir`.

    Args:
        output_dir: The run's output directory (weights already saved there).
        recipe: Name of the recipe.
        model: The trained model (for its config and parameter count).
        dataset_label: Name of the training data.
        optimizer_name: `TrainingArguments.optim`.
        optimizer_hyperparameters: What the optimizer ran with.
        final_metrics: Final metrics (`eval_loss`, `perplexity`, `maxvio_global`, ...).
        log_history: The Trainer's log history.
        training: Training settings for the card.
        routing: Routing facts (`routing_summary`) or `None`.
        expert_load: `measure_expert_load` result or `None`.
        make_plots: Whether to draw the plots.
        base_model: The model fine-tuned from, if any.
        prompt: Prompt in the card's usage example.
    """
    output_dir = Path(output_dir)
    extra = {"expert_load": dict(expert_load)} if expert_load is not None else {}
    write_metrics_file(output_dir, final_metrics, log_history, extra)
    plots = write_run_plots(output_dir, log_history, expert_load) if make_plots else []
    card = render_model_card(
        MODEL_CARD_TEMPLATE,
        model_name=output_dir.resolve().name,
        recipe=recipe,
        dataset_label=dataset_label,
        model_type=model.config.model_type,
        num_parameters=sum(p.numel() for p in model.parameters()),
        optimizer_name=optimizer_name,
        optimizer_hyperparameters=optimizer_hyperparameters,
        metrics=final_metrics,
        training=training,
        routing=routing,
        base_model=base_model,
        plots=plots,
        prompt=prompt,
    )
    card.save(str(output_dir / "README.md"))
    logger.info("Wrote metrics, %d plot(s) and the model card to %s.", len(plots), output_dir)
