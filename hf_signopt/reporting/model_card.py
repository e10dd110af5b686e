"""Render a model card (Hugging Face `ModelCard` / `ModelCardData`) for a recipe's output directory."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData


OPTIMIZER_DESCRIPTIONS = {
    "lion": "Lion (Chen et al. 2023): `p <- p - lr * sign(beta1 * m + (1 - beta1) * g)`, then "
    "`m <- beta2 * m + (1 - beta2) * g`; one state tensor.",
    "signum": "Signum (Bernstein et al. 2018): `m <- mu * m + (1 - mu) * g`, `p <- p - lr * sign(m)`.",
    "signsgd": "signSGD (Bernstein et al. 2018): `p <- p - lr * sign(g)`; no state.",
    "signmomentum": "sign momentum: `m <- mu * m + (1 - mu) * sign(g)`, `p <- p - lr * m`.",
    "simba": "Simba: a windowed integer counter `s` of gradient signs (clamped to `[-w, w]`, 1-2 bytes per "
    "parameter); the step is `sign(s)` where `|s|` exceeds `threshold * w`, else `sign(g)`.",
    "adamw_torch": "AdamW (Loshchilov & Hutter 2019), PyTorch implementation; two state tensors.",
    "adamw_torch_fused": "AdamW (Loshchilov & Hutter 2019), PyTorch fused implementation; two state tensors.",
}
"""One-line description of each optimizer name a recipe may use."""

METRIC_TYPES = {"eval_loss": "loss", "perplexity": "perplexity", "maxvio_global": "maxvio_global"}
"""Result keys that go into the card's `model-index` as evaluation results."""


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_model_card(
    template_path: str | Path,
    *,
    model_name: str,
    recipe: str,
    dataset_label: str,
    model_type: str,
    num_parameters: int,
    optimizer_name: str,
    optimizer_hyperparameters: Mapping[str, Any],
    metrics: Mapping[str, float],
    training: Mapping[str, Any],
    routing: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    plots: Sequence[tuple[str, str]] = (),
    prompt: str = "ROMEO:",
) -> ModelCard:
    """Renders the Jinja `template_path` into a `ModelCard` with hub metadata.

    Metadata: `library_name: transformers`, `pipeline_tag: text-generation`, tags (`moe` and
    `loss-free-balancing` for a loss-free balanced MoE, the optimizer name), datasets, base model,
    and `model-index` results for `eval_loss`, `perplexity` and `maxvio_global` when present.

    Args:
        template_path: A Markdown template whose front matter is `{{ card_data }}`
            (e.g. `model_cards/causal_lm.md`).
        model_name: Name of the model (the output directory's name).
        recipe: The recipe that produced it.
        dataset_label: The training data's name.
        model_type: The config's `model_type`.
        num_parameters: Total parameters.
        optimizer_name: The `TrainingArguments.optim` name.
        optimizer_hyperparameters: The optimizer's hyperparameters as it ran (e.g. its `defaults`).
        metrics: Final metrics, shown in a table; known keys also become hub evaluation results.
        training: Training settings shown in a table (steps, batch size, seed, ...).
        routing: For an MoE: `balancing` (`"loss-free"`, `"aux-loss"` or `"none"`), `score_func`,
            `update_rule`, `update_rate`, `aux_loss_coef`, `num_experts`, `top_k`.
        base_model: The model it was fine-tuned from, if any.
        plots: `(caption, file name relative to the card)` of each plot to embed.
        prompt: Prompt used in the card's usage example.

    Returns:
        The rendered card; `card.save(output_dir / "README.md")` writes it.
    """
    tags = [optimizer_name]
    if routing is not None:
        tags = ["moe"] + (["loss-free-balancing"] if routing.get("balancing") == "loss-free" else []) + tags
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=dataset_label,
            dataset_name=dataset_label,
            dataset_split="validation",
            metric_type=METRIC_TYPES[key],
            metric_name=key,
            metric_value=float(value),
        )
        for key, value in metrics.items()
        if key in METRIC_TYPES
    ]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
        datasets=[dataset_label],
        base_model=base_model,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_name=model_name,
        recipe=recipe,
        dataset_label=dataset_label,
        model_type=model_type,
        num_parameters=f"{num_parameters:,}",
        optimizer_name=optimizer_name,
        optimizer_description=OPTIMIZER_DESCRIPTIONS.get(optimizer_name, ""),
        optimizer_hyperparameters={k: _format(v) for k, v in optimizer_hyperparameters.items()},
        metrics={k: _format(v) for k, v in metrics.items()},
        training={k: _format(v) for k, v in training.items()},
        routing=dict(routing) if routing is not None else None,
        base_model=base_model,
        plots=list(plots),
        prompt=prompt,
    )
