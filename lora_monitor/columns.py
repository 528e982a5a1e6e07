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

# Over-training signals, after the image metrics: does the LoRA still follow new prompts, still vary, or copy
# its training images; and kohya's own held-out loss.
SIGNALS: tuple[Metric, ...] = (
    Metric("val_loss", "min", "val"),  # kohya's loss/validation at or before the row's step
    Metric("clip_t_holdout", "max", "clip_t_ho", -1.0, 1.0),  # clip_t on prompts the captions never had
    Metric("diversity", "max", "divers", 0.0, 2.0),  # 1 - mean cosine among one prompt's seeds (DINO)
    Metric("copy_distance", "max", "copy_d", 0.0, 1.0),  # smallest tiled distance to a reference (lower: a copy)
    Metric("copies", "min", "copies", 0.0, math.inf),  # images closer to a reference than copy_threshold
)
SIGNAL_NAMES: tuple[str, ...] = tuple(m.name for m in SIGNALS)
# Every column a decision (early stopping, best checkpoint) may watch, with its direction.
MONITORABLE: dict[str, str] = {"total_loss": "min", **{m.name: m.mode for m in (*METRICS, *SIGNALS)}}

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
COLUMNS = (*CONTRACT_COLUMNS, "clip_t", "eval_score", "status", "note", "eval_seconds", *SIGNAL_NAMES, "best_strength")
# Columns of an older lora-monitor CSV, which is upgraded in place (new cells empty) when a run continues it.
PREVIOUS_COLUMNS = (*CONTRACT_COLUMNS, "clip_t", "eval_score", "status", "note", "eval_seconds")
# Row statuses: "baseline" is the base model without a LoRA (step 0), evaluated once per run.
BASELINE = "baseline"

# strengths.csv: one row per (checkpoint, LoRA scale) of `[eval] strengths`, with every metric and signal.
STRENGTH_COLUMNS = ("step", "checkpoint", "strength", *METRIC_NAMES, *SIGNAL_NAMES, "timestamp")
STRENGTHS_CSV = "strengths.csv"
