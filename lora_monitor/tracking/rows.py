"""Turn an EvalResult plus what the trainer said into one CSV row.

total_loss, epoch and learning_rate are the trainer's own values at the checkpoint's step, read from its
output or its TensorBoard logs; when it never said them the cell stays empty - never invented.
TensorBoard stores them as float32: they are written as the shortest decimal that reads back as the same
float32 (1e-4, not 9.999999747378752e-05).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_monitor.checkpoints.files import read_header
from lora_monitor.columns import BASELINE, METRIC_NAMES, SIGNAL_NAMES
from lora_monitor.events import EvalResult
from lora_monitor.tracking.tracker import now_iso


@dataclass(frozen=True)
class TrainingValues:
    """What the trainer said of one step: its loss, epoch and learning rate (None: it never said)."""

    loss: float | None = None
    epoch: int | None = None
    learning_rate: float | None = None
    val_loss: float | None = None  # kohya's held-out loss in force at the step (its last validation)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def float32_decimal(value: float | None) -> float | None:
    """The float whose repr is the shortest decimal that round-trips `value` as a float32.

    A value parsed from kohya's printed text (3 significant digits) comes back unchanged: every decimal of
    up to 6 significant digits survives float32.
    """
    if value is None or not abs(value) <= FLOAT32_MAX:  # None, nan, inf, or beyond float32: as it is
        return value
    return float(str(np.float32(value)))


def epoch_from_metadata(path: Path) -> int | None:
    """kohya's ss_epoch is 0-based in step files and 1-based in epoch/final files."""
    try:
        meta = read_header(path).metadata
        value = int(meta["ss_epoch"])
    except (OSError, ValueError, KeyError):
        return None
    return value + 1 if "-step" in path.stem else value


def build_row(result: EvalResult, values: TrainingValues, epoch_hint: int | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "step": result.step,
        "epoch": values.epoch,
        "total_loss": float32_decimal(values.loss),
        "learning_rate": float32_decimal(values.learning_rate),
        "val_loss": float32_decimal(values.val_loss),
        "timestamp": now_iso(),
        "checkpoint": result.checkpoint.name,
        "eval_seconds": round(result.seconds, 3) if result.seconds is not None else None,
    }
    if row["epoch"] is None:
        row["epoch"] = epoch_hint
    if result.skipped:
        row["status"] = "skipped"
        row["note"] = result.note
        return row
    if result.error:
        row["status"] = "failed"
        row["note"] = result.error
        return row
    row.update(scores(result.metrics))
    row["status"] = BASELINE if result.baseline else "duplicate" if result.note else "ok"
    row["note"] = result.note
    return row


def scores(metrics: dict[str, float]) -> dict[str, Any]:
    """The metric and signal cells of a row (copies is a count)."""
    out: dict[str, Any] = {k: v for k, v in metrics.items() if k in METRIC_NAMES or k in SIGNAL_NAMES}
    if "copies" in out:
        out["copies"] = int(out["copies"])
    return out


def strength_rows(result: EvalResult) -> list[dict[str, Any]]:
    """strengths.csv rows of a checkpoint: the 1.0 row's values and each other scale's."""
    if not result.by_strength or result.error or result.skipped:
        return []
    stamp = now_iso()
    by_scale = {1.0: result.metrics, **result.by_strength}
    return [{"step": result.step, "checkpoint": result.checkpoint.name, "strength": scale, "timestamp": stamp,
             **scores(metrics)} for scale, metrics in sorted(by_scale.items())]

