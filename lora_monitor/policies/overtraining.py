"""Is a checkpoint over-trained? Pure rules over one row, the base model's row and the rows before it.

Each image metric measures closeness to the training images, so it keeps improving while a LoRA memorises
its data. These flags look at what memorisation costs instead: the LoRA copies a training image, its seeds
stop differing, it stops following prompts the captions never had, or kohya's held-out loss rises.

A flag is a reason string that starts with the column it is about (`"copies 2 > 0"`), so a short list of
names can be shown where the full text does not fit (`flag_names`). A cell that is empty, in the row or in
the baseline it would be compared with, never flags: a signal that was not measured says nothing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lora_monitor.columns import BASELINE

# Defaults of [best]; the README ("Over-training decisions") says why each is where it is.
DIVERSITY_FRACTION = 0.25  # flagged when diversity < this × the base model's (README: why)
HOLDOUT_MARGIN = 0.03  # flagged when clip_t_holdout < the base model's − this (cosine units)
VAL_LOSS_MARGIN = 0.05  # flagged when val_loss > (1 + this) × its lowest value so far (relative)
MAX_COPIES = 0  # flagged when more images than this are copies of a training image

JUDGED = ("ok", "duplicate")  # statuses of evaluated checkpoints; "failed"/"skipped" rows have no metrics


@dataclass(frozen=True)
class Bounds:
    """How far each signal may move before a checkpoint counts as over-trained (the [best] keys)."""

    diversity_fraction: float = DIVERSITY_FRACTION
    holdout_margin: float = HOLDOUT_MARGIN
    val_loss_margin: float = VAL_LOSS_MARGIN
    max_copies: int = MAX_COPIES


DEFAULT_BOUNDS = Bounds()


def number(value: Any) -> float | None:
    """A CSV cell as a finite float; empty, unparsable or non-finite cells are None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def step_of(row: Mapping[str, Any]) -> int | None:
    value = number(row.get("step"))
    return None if value is None else int(value)


def baseline_of(rows: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The latest baseline row (the base model without a LoRA), or None: the newest matches the current
    evaluation settings when a continued run evaluated the base model again."""
    found = None
    for row in rows:
        if str(row.get("status", "")).strip() == BASELINE:
            found = row
    return found


def _lowest_val_loss(row: Mapping[str, Any], history: Iterable[Mapping[str, Any]]) -> tuple[float, int] | None:
    """(lowest val_loss, its step) over the evaluated checkpoints up to and including the row's step.

    By step, not by arrival: a checkpoint backfilled later still counts where it was in training. The row
    itself is included, so the minimum exists whenever the row has a value.
    """
    step = step_of(row)
    if step is None:
        return None
    lowest: tuple[float, int] | None = None
    for other in (*history, row):
        other_step, value = step_of(other), number(other.get("val_loss"))
        if other_step is None or value is None or other_step > step:
            continue
        if str(other.get("status", "")).strip() not in JUDGED and other is not row:
            continue
        if lowest is None or (value, other_step) < lowest:
            lowest = (value, other_step)
    return lowest


def flags(row: Mapping[str, Any], baseline: Mapping[str, Any] | None, history: Iterable[Mapping[str, Any]],
          bounds: Bounds = DEFAULT_BOUNDS) -> list[str]:
    """Why `row` counts as over-trained (empty: it does not), in a fixed order: copies, diversity,
    clip_t_holdout, val_loss.

    baseline: the base model's row, or None when there is none (then only copies and val_loss can flag).
    history: the rows written so far (the row itself may be among them); only val_loss looks at them.
    """
    reasons = []
    copies = number(row.get("copies"))
    if copies is not None and copies > bounds.max_copies:
        reasons.append(f"copies {copies:g} > {bounds.max_copies} (images closer to a training image than "
                       "copy_threshold)")
    base = baseline or {}
    diversity, base_diversity = number(row.get("diversity")), number(base.get("diversity"))
    if diversity is not None and base_diversity is not None:
        floor = bounds.diversity_fraction * base_diversity
        if diversity < floor:
            reasons.append(f"diversity {diversity:.3f} < {bounds.diversity_fraction:g} × baseline "
                           f"{base_diversity:.3f} (seeds give near-identical images)")
    holdout, base_holdout = number(row.get("clip_t_holdout")), number(base.get("clip_t_holdout"))
    if holdout is not None and base_holdout is not None and holdout < base_holdout - bounds.holdout_margin:
        reasons.append(f"clip_t_holdout {holdout:.3f} < baseline {base_holdout:.3f} − {bounds.holdout_margin:g} "
                       "(ignores new prompts)")
    val_loss = number(row.get("val_loss"))
    lowest = _lowest_val_loss(row, history) if val_loss is not None else None
    if val_loss is not None and lowest is not None and val_loss > lowest[0] * (1 + bounds.val_loss_margin):
        reasons.append(f"val_loss {val_loss:.4g} > {1 + bounds.val_loss_margin:g} × its lowest {lowest[0]:.4g} "
                       f"(step {lowest[1]})")
    return reasons


def flag_names(reasons: Iterable[str]) -> list[str]:
    """The columns named by `reasons`, each once, in order: the short form for the live view."""
    names: list[str] = []
    for reason in reasons:
        name = reason.split(" ", 1)[0]
        if name not in names:
            names.append(name)
    return names


def flag_rows(rows: list[Mapping[str, Any]],
              bounds: Bounds = DEFAULT_BOUNDS) -> list[tuple[Mapping[str, Any], list[str]]]:
    """(row, reasons) for every evaluated checkpoint (status ok or duplicate), in the rows' order.

    Judged afresh over all rows each time: a baseline or an earlier checkpoint written late (eval-dir,
    backfill) changes the flags of rows written before it.
    """
    baseline = baseline_of(rows)
    return [(row, flags(row, baseline, rows, bounds)) for row in rows
            if str(row.get("status", "")).strip() in JUDGED]
