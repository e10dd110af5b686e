"""What the recipes leave beside a trained model: a metrics file, PNG plots and a model card.

Plots need matplotlib, an optional extra (`pip install "hf-signopt[plots]"`); everything else here
works without it.
"""

from .measurements import StepTimeCallback, optimizer_state_bytes
from .metrics import METRICS_FILE_NAME, metric_series, write_metrics_file
from .model_card import render_model_card
from .plots import plot_curves, plot_expert_load, require_matplotlib


__all__ = [
    "METRICS_FILE_NAME",
    "StepTimeCallback",
    "metric_series",
    "optimizer_state_bytes",
    "plot_curves",
    "plot_expert_load",
    "render_model_card",
    "require_matplotlib",
    "write_metrics_file",
]
