"""The report's curves: every metric, signal and loss against step, as one inline SVG (matplotlib, no pyplot).

Each panel marks the best checkpoint, the early stop, the checkpoints the best-checkpoint rule excluded as
over-trained, and the base model's value (the `baseline` row) as a horizontal line where it has one.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from lora_monitor.columns import BASELINE, LOSS_KEYS, MONITORABLE

TEXT_COLUMNS = ("timestamp", "checkpoint", "status", "note")
NOT_CURVES = {"step", "epoch", "eval_seconds", "learning_rate", "best_strength", *TEXT_COLUMNS}
# kohya's own values: valid at every evaluated step, whatever became of the evaluation.
TRAINER_VALUES = ("total_loss", "val_loss", "learning_rate")
# Panels in this order first (the training loss beside kohya's validation loss); any other numeric column
# (a metric added later) follows.
CURVE_ORDER = ("total_loss", "val_loss", "eval_score", *LOSS_KEYS,
               *(m for m in MONITORABLE if m not in (*LOSS_KEYS, "total_loss", "val_loss", "eval_score")))
LABELS = {"total_loss": "training loss (total_loss)", "val_loss": "kohya validation loss (val_loss)",
          "learning_rate": "learning rate"}
GREEN, RED, BLUE, ORANGE, GREY = "#2e8b57", "#c0392b", "#3b6ea8", "#e67e22", "#7f7f7f"


@dataclass(frozen=True)
class Marks:
    """Steps to mark on every curve; None when unknown."""

    best_step: int | None
    stop_step: int | None
    flagged_steps: tuple[int, ...] = ()  # checkpoints excluded as over-trained (best.json "excluded")


def curve_columns(frame: pd.DataFrame) -> list[str]:
    """The numeric columns with a value, in panel order; learning_rate last."""
    numeric = [c for c in frame.columns if c not in NOT_CURVES and frame[c].notna().any()]
    ordered = [c for c in CURVE_ORDER if c in numeric] + sorted(c for c in numeric if c not in CURVE_ORDER)
    if "learning_rate" in frame.columns and frame["learning_rate"].notna().any():
        ordered.append("learning_rate")
    return ordered


def _title(column: str) -> str:
    direction = {"min": " - lower is better", "max": " - higher is better"}.get(MONITORABLE.get(column, ""), "")
    return LABELS.get(column, column) + direction


def baseline_value(frame: pd.DataFrame, column: str) -> float | None:
    """The base model's value of `column` (the last baseline row that has one); None without one."""
    if column not in frame.columns:
        return None
    values = frame.loc[frame["status"] == BASELINE, column].dropna()
    return float(values.iloc[-1]) if len(values) else None


def _draw_panel(ax: Any, frame: pd.DataFrame, column: str, marks: Marks) -> None:
    """One column vs step; gids (curve-/best-/stop-/baseline-<column>) become element ids in the SVG."""
    known = frame[frame["step"].notna() & (frame["status"] != BASELINE)]
    points = known if column in TRAINER_VALUES else known[known["status"] == "ok"]
    points = points[points[column].notna()]
    ax.plot(points["step"], points[column], "o-", color=BLUE, ms=3.5, lw=1.4, gid=f"curve-{column}")
    failed = known[known["status"] == "failed"]
    if len(failed):  # along the bottom edge: a failed evaluation has no value to place
        bottom = ax.get_xaxis_transform()
        ax.plot(failed["step"], [0.03] * len(failed), "x", color=RED, ms=6, transform=bottom, label="eval failed")
    base = baseline_value(frame, column)
    if base is not None:
        ax.axhline(base, color=GREY, ls=":", lw=1.5, label="base model, no LoRA (baseline)", gid=f"baseline-{column}")
    flagged = points[points["step"].isin(marks.flagged_steps)]
    if len(flagged):
        ax.plot(flagged["step"], flagged[column], "o", mfc="none", mec=ORANGE, mew=1.6, ms=9,
                label="excluded as over-trained", gid=f"flagged-{column}")
    if marks.best_step is not None:
        ax.axvline(marks.best_step, color=GREEN, lw=1.2, label=f"best (step {marks.best_step})", gid=f"best-{column}")
        at_best = points[points["step"] == marks.best_step]
        ax.plot(at_best["step"], at_best[column], "*", color=GREEN, ms=13)
    if marks.stop_step is not None:
        ax.axvline(marks.stop_step, color=RED, ls="--", lw=1.2, label=f"early stop (step {marks.stop_step})",
                   gid=f"stop-{column}")
    ax.set_title(_title(column), fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)


def curves_svg(frame: pd.DataFrame, marks: Marks) -> str | None:
    """Every curve vs step as one inline <svg>; None when nothing to plot."""
    columns = curve_columns(frame)
    if not columns or (frame["step"].notna() & (frame["status"] != BASELINE)).sum() == 0:
        return None
    ncols = 1 if len(columns) == 1 else 2
    nrows = math.ceil(len(columns) / ncols)
    figure = Figure(figsize=(11, 2.9 * nrows + 0.4), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, column in zip(axes, columns, strict=False):
        _draw_panel(ax, frame, column, marks)
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    # One legend for the figure: every kind of mark once, whichever panels have it.
    legend: dict[str, Any] = {}
    for ax in axes[: len(columns)]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    if legend:
        figure.legend(list(legend.values()), list(legend), loc="outside upper center", ncols=min(len(legend), 5),
                      fontsize=8, frameon=False)
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE so it nests in HTML
