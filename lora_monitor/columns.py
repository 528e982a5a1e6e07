"""The one list of what a row holds: the CSV's columns and, for each metric, its direction, range and label.

Every other module (metrics, tracker, rows, live view, report, early stopping, config) reads these names
from here, so adding a metric is one entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    """A metric column. `mode` is "min" when lower is better; `short` is the live table's header."""

    name: str
    mode: str
    short: str
    low: float = 0.0
    high: float = math.inf
    weight: float | None = None  # its default weight in eval_score; None: not part of eval_score


# The image metrics the scorer writes, in CSV order.
METRICS: tuple[Metric, ...] = (
    Metric("visual_loss", "min", "visual", 0.0, 2.0, weight=0.2),
    Metric("fashion_clip_loss", "min", "fclip", 0.0, 2.0, weight=0.6),
    # colour in ΔE-like units; no hard upper bound below ~200
    Metric("color_loss", "min", "color", 0.0, math.inf, weight=0.2),
    Metric("clip_t", "max", "clip_t", -1.0, 1.0),
    Metric("eval_score", "min", "score", 0.0, math.inf),
)
METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)
BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}
# The losses that make up eval_score, and their default weights.
LOSS_KEYS: tuple[str, ...] = tuple(m.name for m in METRICS if m.weight is not None)
DEFAULT_WEIGHTS: dict[str, float] = {m.name: float(m.weight) for m in METRICS if m.weight is not None}
HIGHER_IS_BETTER: dict[str, bool] = {m.name: m.mode == "max" for m in METRICS}
METRIC_RANGES: dict[str, tuple[float, float]] = {m.name: (m.low, m.high) for m in METRICS}
# Every column a decision (early stopping, best checkpoint) may watch, with its direction.
MONITORABLE: dict[str, str] = {"total_loss": "min", **{m.name: m.mode for m in METRICS}}

# The CSV: the first nine columns are the contract other tools read; the rest follow.
CONTRACT_COLUMNS = (
    "step",
    "epoch",
    "total_loss",
    "visual_loss",
    "fashion_clip_loss",
    "color_loss",
    "learning_rate",
    "timestamp",
    "checkpoint",
)
COLUMNS = (*CONTRACT_COLUMNS, "clip_t", "eval_score", "status", "note", "eval_seconds")
