"""Helpers of the comparison recipes: one run per variant, a Markdown table, resuming per run."""

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint


def variant_resume(resume_from_checkpoint: str | None, run_dir: Path) -> str | None:
    """`--resume_from_checkpoint last` for one variant: its newest checkpoint, or a fresh start if none.

    Any other value than `None` or `"last"` would point every variant at the same checkpoint, which
    cannot be right, so it is refused.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint != "last":
        raise ValueError(
            f"A comparison resumes each run from its own last checkpoint: use --resume_from_checkpoint last, "
            f"not {resume_from_checkpoint!r}."
        )
    return "last" if run_dir.is_dir() and get_last_checkpoint(str(run_dir)) is not None else None


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return " ".join(_cell(v, 2) for v in value)
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Mapping[str, str], digits: int = 4) -> str:
    """Formats rows as a Markdown table.

    Args:
        rows: One mapping per row.
        columns: Row key -> column header, in display order.
        digits: Decimals of float cells (lists of floats get 2).

    Returns:
        The table, one line per row after the header.
    """
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[key], digits) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_comparison(output_dir: Path, name: str, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes `<name>.md` (the table) and `<name>.json` (the rows) into `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.md").write_text(table + "\n", encoding="utf-8")
    (output_dir / f"{name}.json").write_text(json.dumps(list(rows), indent=2) + "\n", encoding="utf-8")
