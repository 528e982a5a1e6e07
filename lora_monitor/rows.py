"""Turn an EvalResult plus what the trainer said into one CSV row.

total_loss, epoch and learning_rate are the trainer's own values at the checkpoint's step, read from its
output or its TensorBoard logs; when it never said them the cell stays empty - never invented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_monitor.events import EvalResult
from lora_monitor.lora_files import read_header
from lora_monitor.tracker import now_iso


@dataclass
class TrainerFacts:
    """What is known of the trainer's values per step (from its output and/or TensorBoard)."""

    loss_at_step: dict[int, float] = field(default_factory=dict)
    epoch_at_step: dict[int, int] = field(default_factory=dict)
    lr_at_step: dict[int, float] = field(default_factory=dict)


def epoch_from_metadata(path: Path) -> int | None:
    """kohya's ss_epoch is 0-based in step files and 1-based in epoch/final files."""
    try:
        meta = read_header(path).metadata
        value = int(meta["ss_epoch"])
    except (OSError, ValueError, KeyError):
        return None
    return value + 1 if "-step" in path.stem else value


def build_row(result: EvalResult, facts: TrainerFacts, epoch_hint: int | None = None) -> dict[str, Any]:
    step = result.step
    row: dict[str, Any] = {
        "step": step,
        "epoch": facts.epoch_at_step.get(step) if step is not None else None,
        "total_loss": facts.loss_at_step.get(step) if step is not None else None,
        "learning_rate": facts.lr_at_step.get(step) if step is not None else None,
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
    row.update({k: v for k, v in result.metrics.items() if k in _METRIC_KEYS})
    row["status"] = "duplicate" if result.note else "ok"
    row["note"] = result.note
    return row


_METRIC_KEYS = ("visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score")
