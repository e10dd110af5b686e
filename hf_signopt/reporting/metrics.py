"""The metrics file a recipe writes, and series read from a Trainer's log history."""

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


METRICS_FILE_NAME = "metrics.json"


def metric_series(log_history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Extracts one logged metric over training steps.

    Args:
        log_history: `Trainer.state.log_history`: one dict per log event, each with a `step`.
        key: The metric, e.g. `"loss"`, `"eval_loss"` or `"moe/maxvio"`.

    Returns:
        `(steps, values)` in logging order, for the events that carry `key`.
    """
    steps, values = [], []
    for entry in log_history:
        if key in entry:
            steps.append(int(entry["step"]))
            values.append(float(entry[key]))
    return steps, values


def _json_safe(value: Any) -> Any:
    """Non-finite floats become strings, since JSON has no NaN or infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_metrics_file(
    output_dir: str | Path,
    final: Mapping[str, Any],
    log_history: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Writes `metrics.json`: final metrics, the run's log history and any extra sections.

    Args:
        output_dir: Directory to write into (created if needed).
        final: Final metrics, e.g. `{"eval_loss": 3.1, "perplexity": 22.2}`.
        log_history: `Trainer.state.log_history`, kept so curves can be re-plotted later.
        extra: More top-level sections, e.g. per-layer expert loads.

    Returns:
        The path of the file written.
    """
    path = Path(output_dir) / METRICS_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"final": dict(final), "log_history": list(log_history), **dict(extra or {})}
    path.write_text(json.dumps(_json_safe(content), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
