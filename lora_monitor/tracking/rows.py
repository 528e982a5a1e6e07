"""Turn an EvalResult plus what the trainer said into one CSV row.

total_loss, epoch and learning_rate are the trainer's own values at the checkpoint's step, read from its
output or its TensorBoard logs; when it never said them the cell stays empty - never invented.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_monitor.checkpoints.files import read_header
from lora_monitor.columns import METRIC_NAMES
from lora_monitor.events import EvalResult
from lora_monitor.tracking.tracker import now_iso


@dataclass(frozen=True)
class TrainingValues:
    """What the trainer said of one step: its loss, epoch and learning rate (None: it never said)."""

    loss: float | None = None
    epoch: int | None = None
    learning_rate: float | None = None


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
        "total_loss": values.loss,
        "learning_rate": values.learning_rate,
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
    row.update({k: v for k, v in result.metrics.items() if k in METRIC_NAMES})
    row["status"] = "duplicate" if result.note else "ok"
    row["note"] = result.note
    return row

