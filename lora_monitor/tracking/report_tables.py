"""The report's tables: the checkpoints (each metric's change against the baseline on hover), the best and
the last checkpoint against the base model, and the strength sweep (strengths.csv, checkpoint x LoRA scale)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from lora_monitor.columns import BASELINE, MONITORABLE, SIGNALS
from lora_monitor.tracking.report_charts import TEXT_COLUMNS, baseline_value, curve_columns


def read_rows(csv_path: Path) -> pd.DataFrame:
    """A CSV of the run with numeric columns as floats (NaN = unknown); an absent or empty file gives no rows."""
    csv_path = Path(csv_path)
    if not csv_path.is_file() or csv_path.stat().st_size == 0:
        return pd.DataFrame(columns=["step", "checkpoint", "status"])
    try:
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, on_bad_lines="skip")
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=["step", "checkpoint", "status"])
    for column in frame.columns:
        if column not in TEXT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column].replace("", math.nan), errors="coerce")
    for column in ("step", "checkpoint", "status"):
        if column not in frame.columns:
            frame[column] = math.nan if column == "step" else ""
    return frame.sort_values("step", kind="stable", na_position="last").reset_index(drop=True)


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def change(value: Any, base: float | None, column: str) -> tuple[str, str]:
    """(text, class) of `value` against the base model's: "-0.0123 (-45 %)" and "better"/"worse"/"same"."""
    try:
        delta = float(value) - base  # type: ignore[operator]
    except (TypeError, ValueError):
        return "", ""
    if math.isnan(delta):
        return "", ""
    text = f"{delta:+.4g}" + (f" ({100 * delta / abs(base):+.0f} %)" if base else "")
    if delta == 0 or column not in MONITORABLE:
        return text, "same" if delta == 0 else ""
    return text, "better" if (delta < 0) == (MONITORABLE[column] == "min") else "worse"


def checkpoint_table(frame: pd.DataFrame, best_name: str | None, flags: dict[str, list[str]]) -> str:
    if frame.empty:
        return '<p class="empty">No checkpoint has been evaluated yet.</p>'
    # The note (why an evaluation failed) before the long timestamp, so it shows without scrolling.
    wanted = ["checkpoint", "step", "epoch", "status", *curve_columns(frame), "best_strength", "eval_seconds",
              "note", "timestamp"]
    columns = list(dict.fromkeys(c for c in wanted if c in frame.columns))
    bases = {c: baseline_value(frame, c) for c in columns if c in MONITORABLE}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for _, row in frame.iterrows():
        name = str(row["checkpoint"])
        classes = [str(row["status"])] + (["best"] if name == best_name else []) + (["flagged"] if name in flags
                                                                                  else [])
        note = fmt(row.get("note", ""))
        cells = ""
        for column in columns:
            # The status cell carries the note on hover: the note column itself may be scrolled out of view.
            title = note if column == "status" else ""
            if column == "checkpoint" and name in flags:
                title = "excluded as over-trained: " + "; ".join(flags[name])
            elif row["status"] != BASELINE and bases.get(column) is not None:
                delta, _ = change(row[column], bases[column], column)
                title = f"vs baseline {delta}" if delta else ""
            attr = f' title="{html.escape(title)}"' if title else ""
            cells += f"<td{attr}>{html.escape(fmt(row[column]))}</td>"
        rows.append(f'<tr class="{html.escape(" ".join(classes))}">{cells}</tr>')
    return (f'<div class="scroll"><table class="rows"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def baseline_table(frame: pd.DataFrame, best_name: str | None) -> str:
    """Each metric of the base model (no LoRA), the best checkpoint and the last evaluated one, with changes."""
    if frame.empty or not (frame["status"] == BASELINE).any():
        return ('<p class="empty">No baseline row (the base model without a LoRA) in the CSV; train writes it '
                "before the first checkpoint, eval-dir when it is missing.</p>")
    ok = frame[(frame["status"] == "ok") & frame["step"].notna()]
    picked: list[tuple[str, pd.Series]] = []
    best = ok[ok["checkpoint"] == best_name]
    if len(best):
        picked.append(("best", best.iloc[0]))
    if len(ok) and ok.iloc[-1]["checkpoint"] != best_name:
        picked.append(("last", ok.iloc[-1]))
    columns = [c for c in curve_columns(frame) if c in MONITORABLE and c != "total_loss"]
    head = "<th>metric</th><th>better</th><th>baseline</th>" + "".join(
        f'<th title="{html.escape(str(row["checkpoint"]))}">{what} (step {fmt(row["step"])})</th>'
        f"<th>vs baseline</th>" for what, row in picked)
    rows = []
    for column in columns:
        base = baseline_value(frame, column)
        cells = f"<th>{column}</th><td>{'lower' if MONITORABLE[column] == 'min' else 'higher'}</td>"
        cells += f"<td>{fmt(base) if base is not None else 'not measured'}</td>"
        for _, row in picked:
            text, kind = change(row[column], base, column)
            cells += f'<td>{fmt(row[column])}</td><td class="{kind}">{html.escape(text)}</td>'
        rows.append(f"<tr>{cells}</tr>")
    return (f'<div class="scroll"><table class="vs"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


STRENGTH_SHOWN = ("eval_score", *(m.name for m in SIGNALS if m.name != "val_loss"))


def _values(row: pd.Series) -> list[str]:
    return [f"{c} {fmt(row[c])}" for c in STRENGTH_SHOWN if c in row.index and fmt(row[c])]


def _strength_cell(row: pd.Series, best: bool) -> str:
    lines = _values(row)
    if best:
        lines[0] = f"&#9733; best_strength<br><b>{lines[0]}</b>" if lines else "&#9733; best_strength"
    title = ' title="best_strength: the scale the [best] rule prefers for this checkpoint"' if best else ""
    return f'<td class="{"best-strength" if best else ""}"{title}>{"<br>".join(lines)}</td>'


def strength_table(strengths: pd.DataFrame, frame: pd.DataFrame, best_name: str | None,
                   flags: dict[str, list[str]]) -> str:
    """checkpoint x LoRA scale: eval_score and the signals, each checkpoint's best_strength starred; the
    checkpoints excluded as over-trained (at scale 1.0) marked as in the checkpoint table."""
    rows = strengths[strengths["step"].notna() & strengths["checkpoint"].ne("")] if len(strengths) else strengths
    if rows.empty or "strength" not in rows.columns:
        return ('<p class="empty">No strength sweep: <code>[eval] strengths</code> lists only 1.0 (no '
                "strengths.csv).</p>")
    scales = sorted(rows["strength"].dropna().unique())
    chosen = {}
    if "best_strength" in frame.columns:
        chosen = {str(r["checkpoint"]): r["best_strength"] for _, r in frame.iterrows()
                  if pd.notna(r["best_strength"])}
    head = "<th>checkpoint</th><th>step</th>" + "".join(f"<th>strength {fmt(float(s))}</th>" for s in scales)
    body = []
    base = frame[frame["status"] == BASELINE]
    if len(base):  # the base model has no LoRA to scale: one row across every strength, to compare with
        body.append(f'<tr class="baseline"><th>baseline (no LoRA)</th><td>0</td>'
                    f'<td colspan="{len(scales)}">{" &middot; ".join(_values(base.iloc[0]))}</td></tr>')
    for name, group in rows.groupby("checkpoint", sort=False):
        by_scale = {float(r["strength"]): r for _, r in group.iterrows() if pd.notna(r["strength"])}
        cells = "".join(_strength_cell(by_scale[s], chosen.get(str(name)) == s) if s in by_scale
                        else '<td class="missing">-</td>' for s in scales)
        kind = ' class="best"' if name == best_name else ' class="flagged"' if name in flags else ""
        why = f' title="excluded as over-trained: {html.escape("; ".join(flags[name]))}"' if name in flags else ""
        body.append(f"<tr{kind}><th{why}>{html.escape(str(name))}</th><td>{fmt(group['step'].iloc[0])}</td>"
                    f"{cells}</tr>")
    return (f'<div class="scroll"><table class="strengths"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>")
