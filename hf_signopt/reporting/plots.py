"""PNG plots of a run: loss / MaxVio curves and per-expert load heat maps (matplotlib, optional)."""

from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType


def require_matplotlib() -> ModuleType:
    """Imports matplotlib for off-screen rendering.

    Returns:
        The `matplotlib` module.

    Raises:
        ImportError: Saying how to install the `plots` extra, when matplotlib is missing.
    """
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "Plots need matplotlib, an optional extra of hf-signopt: pip install \"hf-signopt[plots]\" "
            "(or pip install matplotlib)."
        ) from error
    return matplotlib


def _new_figure(width: float, height: float):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    title: str,
    xlabel: str = "step",
    ylabel: str = "loss",
    log_y: bool = False,
) -> Path:
    """Plots one line per named series, e.g. train and eval loss, or one loss per optimizer.

    Args:
        series: Label -> `(x, y)`; empty series are skipped.
        path: PNG file to write.
        title: Figure title.
        xlabel: X-axis label.
        ylabel: Y-axis label.
        log_y: Logarithmic y axis.

    Returns:
        The path written.

    Raises:
        ValueError: If no series has a point, or x and y lengths differ.
    """
    drawable = {label: xy for label, xy in series.items() if len(xy[0]) > 0}
    if not drawable:
        raise ValueError(f"Nothing to plot for {title!r}: every series is empty ({sorted(series)}).")
    figure = _new_figure(6.4, 4.0)
    axes = figure.add_subplot()
    for label, (x, y) in drawable.items():
        if len(x) != len(y):
            raise ValueError(f"Series {label!r} has {len(x)} x values but {len(y)} y values.")
        axes.plot(x, y, label=label, marker="o" if len(x) <= 20 else None, markersize=3)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    if log_y:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_expert_load(
    loads: Mapping[str, Sequence[Sequence[float]]],
    path: str | Path,
    title: str = "Per-expert load (share of routed tokens / mean share)",
) -> Path:
    """Draws one heat map per run: rows are MoE layers, columns experts, colour the relative load.

    A relative load of 1 is perfect balance; MaxVio of a layer is its largest value minus 1.

    Args:
        loads: Run label -> per-layer, per-expert token counts or fractions (rows are normalised
            here, so either works). All runs must have the same number of experts.
        path: PNG file to write.
        title: Figure title.

    Returns:
        The path written.

    Raises:
        ValueError: On no runs, an empty or ragged matrix, or a layer that routed no token.
    """
    if not loads:
        raise ValueError("Nothing to plot: no expert loads given.")
    relative = {}
    for label, matrix in loads.items():
        rows = [list(map(float, row)) for row in matrix]
        if not rows or any(len(row) != len(rows[0]) or not row for row in rows):
            raise ValueError(f"Expert loads of {label!r} must be a non-empty rectangular layers x experts matrix.")
        for layer, row in enumerate(rows):
            if sum(row) <= 0:
                raise ValueError(f"Layer {layer} of {label!r} routed no token; cannot draw its relative load.")
        relative[label] = [[value * len(row) / sum(row) for value in row] for row in rows]

    n_layers = max(len(m) for m in relative.values())
    n_experts = len(next(iter(relative.values()))[0])
    if any(len(m[0]) != n_experts for m in relative.values()):
        raise ValueError(f"All runs must have the same number of experts: {[len(m[0]) for m in relative.values()]}.")
    figure = _new_figure(max(4.0, 1.2 + 0.55 * n_experts) * len(relative), 1.6 + 0.5 * n_layers)
    panels = figure.subplots(1, len(relative), squeeze=False)[0]
    from matplotlib.colors import TwoSlopeNorm

    # White is perfect balance (relative load 1); red overloaded, blue underused.
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, max(max(row) for m in relative.values() for row in m)))
    image = None
    for axes, (label, matrix) in zip(panels, relative.items()):
        image = axes.imshow(matrix, cmap="RdBu_r", norm=norm, aspect="auto")
        axes.set_title(label)
        axes.set_xlabel("expert")
        axes.set_ylabel("layer")
        axes.set_xticks(range(len(matrix[0])))
        axes.set_yticks(range(len(matrix)))
        if len(matrix) * len(matrix[0]) <= 128:
            for layer, row in enumerate(matrix):
                for expert, value in enumerate(row):
                    # Light text on the dark ends of the colour map, dark text elsewhere.
                    shade = "white" if abs(float(norm(value)) - 0.5) > 0.35 else "black"
                    axes.text(expert, layer, f"{value:.2f}", ha="center", va="center", fontsize=7, color=shade)
    figure.colorbar(image, ax=list(panels), label="load / mean load")
    figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
