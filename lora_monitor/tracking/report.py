"""One self-contained `report.html` per run: summary, the baseline comparison, curves, image grid, strength
sweep, checkpoint table, timings and config.

The page opens from disk with no server and no network: plots are inline SVG, thumbnails are embedded as
data URIs, and only the "full size" links point elsewhere (relative paths into the run's eval/ folder and to
the reference images). The parts live in report_charts (curves), report_images (grid) and report_tables.
"""

from __future__ import annotations

import html
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from lora_monitor.columns import BASELINE, STRENGTHS_CSV
from lora_monitor.policies.best_checkpoint import atomic_write_bytes
from lora_monitor.tracking.report_charts import Marks, curves_svg
from lora_monitor.tracking.report_images import grid_html
from lora_monitor.tracking.report_tables import (
    baseline_table,
    checkpoint_table,
    fmt,
    read_rows,
    strength_table,
)

REPORT_NAME = "report.html"
__all__ = ["REPORT_NAME", "build_report", "read_rows"]


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _timing_rows(frame: pd.DataFrame, timings: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(what, how long) pairs: the caller's timings (seconds, or text) then what the CSV tells."""
    rows = []
    for key, value in (timings or {}).items():
        label = key[:-2] if key.endswith("_s") else key
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        rows.append((label.replace("_", " "), _duration(float(value)) if is_number else str(value)))
    if "eval_seconds" in frame.columns and frame["eval_seconds"].notna().any():
        seconds = frame["eval_seconds"].dropna()
        rows.append(("evaluation, all checkpoints", _duration(float(seconds.sum()))))
        rows.append(("evaluation, mean per checkpoint", _duration(float(seconds.mean()))))
    if "timestamp" in frame.columns:
        stamps = pd.to_datetime(frame["timestamp"], errors="coerce", utc=True, format="ISO8601").dropna()
        if len(stamps) > 1:
            rows.append(
                ("first to last evaluated row", _duration((stamps.max() - stamps.min()).total_seconds()))
            )
    return rows


def _summary(frame: pd.DataFrame, best: dict[str, Any] | None, early_stop: str | None) -> str:
    checkpoints = frame[frame["status"] != BASELINE]
    counts = checkpoints["status"].replace("", "unknown").value_counts() if len(checkpoints) else pd.Series(dtype=int)
    status = ", ".join(f"{count} {name}" for name, count in counts.items()) or "none yet"
    items = [f"<dt>checkpoints</dt><dd>{len(checkpoints)} ({html.escape(status)})</dd>"]
    base = "evaluated (step 0, no LoRA)" if (frame["status"] == BASELINE).any() else "none in the CSV"
    items.append(f"<dt>baseline</dt><dd>{base}</dd>")
    if best and best.get("checkpoint") is None:  # best.json: every checkpoint flagged as over-trained
        items.append(f'<dt>best</dt><dd class="stop">none: {html.escape(str(best.get("rule") or ""))}</dd>')
    elif best:
        metrics = ", ".join(f"{k} {fmt(v)}" for k, v in (best.get("metrics") or {}).items())
        items.append(
            f'<dt>best</dt><dd class="best-text">{html.escape(str(best.get("checkpoint", "?")))} '
            f"(step {html.escape(fmt(best.get('step')) or '?')})"
            f"{'; ' + html.escape(metrics) if metrics else ''}"
            f"{'<br>rule: ' + html.escape(str(best['rule'])) if best.get('rule') else ''}</dd>"
        )
    else:
        items.append("<dt>best</dt><dd>none yet</dd>")
    items.append(_exclusions(best or {}))
    stop = html.escape(early_stop) if early_stop else "not triggered"
    items.append(f'<dt>early stop</dt><dd class="{"stop" if early_stop else ""}">{stop}</dd>')
    return f"<dl>{''.join(items)}</dl>"


def _exclusions(best: dict[str, Any]) -> str:
    """best.json's checkpoints excluded as over-trained, with why, and the best's own flags ("" if none)."""
    entries = [
        f"<li>{html.escape(str(e.get('checkpoint', '?')))} (step {html.escape(fmt(e.get('step')) or '?')}, "
        f"eval_score {html.escape(fmt(e.get('eval_score')) or '?')}): "
        f"{html.escape('; '.join(map(str, e.get('reasons') or [])))}</li>"
        for e in best.get("excluded") or []
    ]
    out = f"<dt>excluded as over-trained</dt><dd><ul class=excluded>{''.join(entries)}</ul></dd>" if entries else ""
    if best.get("flags"):
        out += f'<dt>best is flagged</dt><dd class="stop">{html.escape("; ".join(map(str, best["flags"])))}</dd>'
    return out


def _flags(best: dict[str, Any] | None) -> dict[str, list[str]]:
    """checkpoint -> why the best-checkpoint rule excluded it (best.json "excluded")."""
    return {str(e.get("checkpoint")): [str(r) for r in e.get("reasons") or []]
            for e in (best or {}).get("excluded") or [] if isinstance(e, dict) and e.get("checkpoint")}


def _marks(frame: pd.DataFrame, best: dict[str, Any] | None, stop_step: int | None) -> Marks:
    flagged = frame.loc[frame["checkpoint"].isin(list(_flags(best))) & frame["step"].notna(), "step"]
    best_step = None
    if best:
        step = best.get("step")
        if isinstance(step, int | float) and not isinstance(step, bool) and math.isfinite(step):
            best_step = int(step)
        else:
            match = frame[(frame["checkpoint"] == best.get("checkpoint")) & frame["step"].notna()]
            best_step = int(match["step"].iloc[0]) if len(match) else None
    return Marks(best_step, stop_step, tuple(int(s) for s in flagged))


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin:0 0 16px}.empty{color:#777;font-style:italic}
dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 16px}dt{font-weight:600}dd{margin:0}
dd.stop{color:#c0392b}.best-text{color:#1e6b41}
.scroll{overflow-x:auto}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ddd;padding:4px 6px;vertical-align:top}
table.rows tr.failed{background:#fdecea}table.rows tr.skipped,table.rows tr.duplicate{color:#777}
table.rows tr.best{background:#e8f5ec;font-weight:600}table.rows td{white-space:nowrap}
table.rows tr.baseline{background:#f2f2f2;font-style:italic}table.rows tr.flagged td:first-child{color:#b9560b}
th{text-align:left}td.better{color:#1e6b41}td.worse{color:#c0392b}table.vs td{white-space:nowrap}
table.grid th{font-weight:normal;font-size:12px;text-align:center;min-width:112px;white-space:nowrap}
table.grid th.best{background:#e8f5ec;outline:2px solid #2e8b57}table.grid th.baseline{background:#f2f2f2}
table.grid th.flagged{background:#fdf2e7}.flag{color:#b9560b;font-weight:600}
table.grid th.prompt{text-align:left;max-width:220px;min-width:140px;white-space:normal}
table.grid td.seed,table.grid th.seed{color:#777;font-size:11px;min-width:0;vertical-align:middle}
table.grid tr.group th{text-align:left;background:#f6f8fa;font-weight:600;font-size:13px}
table.grid tbody.holdout{border-top:3px solid #999}
table.grid td{text-align:center;padding:2px}table.grid td.missing{color:#aaa;vertical-align:middle}
table.grid img{width:112px;height:auto;image-rendering:pixelated;display:block;margin:0 auto}
table.grid th.refs{background:#eef3fa}table.grid td.refs{background:#f7f9fc}
div.refs{display:flex;flex-wrap:wrap;gap:4px;justify-content:center}div.refs img{margin:0}
table.strengths td{white-space:nowrap;font-size:12px}td.best-strength{background:#e8f5ec;outline:2px solid #2e8b57}
table.strengths tr.best th{color:#1e6b41}table.strengths tr.flagged th{color:#b9560b}
table.strengths tr.baseline{background:#f2f2f2;font-style:italic}
svg{max-width:100%;height:auto}pre{background:#f6f8fa;padding:12px;overflow-x:auto;font-size:12px}
"""


def _page(title: str, header: str, sections: list[tuple[str, str, str]]) -> str:
    """header: HTML above the sections; sections: (id, heading, inner HTML)."""
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(head)}</h2>{inner}</section>' for sid, head, inner in sections
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>{header}{body}</body></html>\n"
    )


def build_report(
    output_dir: Path,
    csv_path: Path,
    config_text: str | None,
    best: dict[str, Any] | None,
    early_stop: str | None = None,
    timings: dict[str, Any] | None = None,
    stop_step: int | None = None,
) -> Path:
    """Write `output_dir/report.html` atomically and return its path.

    best: best.json's content (checkpoint, step, metrics, rule) or None. early_stop: the stop reason or None.
    timings: name -> seconds (numbers; a trailing "_s" in the name is dropped) or preformatted text.
    """
    output_dir = Path(output_dir)
    frame = read_rows(csv_path)
    marks = _marks(frame, best, stop_step)
    flags = _flags(best)
    best_name = str(best["checkpoint"]) if best and best.get("checkpoint") else None
    svg = curves_svg(frame, marks)
    timing_rows = _timing_rows(frame, timings)
    timing_html = (
        "<table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in timing_rows)
        + "</table>"
        if timing_rows
        else '<p class="empty">No timings recorded.</p>'
    )
    config_html = (
        f"<pre>{html.escape(config_text)}</pre>" if config_text else '<p class="empty">Not recorded.</p>'
    )
    generated = datetime.now().astimezone().isoformat(timespec="seconds")
    header = (
        f"<h1>LoRA training report</h1><p class=sub>{html.escape(str(output_dir))} &middot; "
        f"generated {html.escape(generated)}</p>"
    )
    sections = [
        ("summary", "Summary", _summary(frame, best, early_stop)),
        ("baseline", "Against the base model (baseline: no LoRA)", baseline_table(frame, best_name)),
        ("curves", "Curves", svg or '<p class="empty">No evaluated checkpoint with a known step yet.</p>'),
        ("grid", "Images (prompts and seeds x checkpoints; click for full size)",
         grid_html(output_dir, frame, best_name, flags)),
        ("strengths", "LoRA strengths (eval_score and signals per scale)",
         strength_table(read_rows(Path(csv_path).with_name(STRENGTHS_CSV)), frame, best_name, flags)),
        ("checkpoints", "Checkpoints (hover a value: its change against the baseline)",
         checkpoint_table(frame, best_name, flags)),
        ("timings", "Timings", timing_html),
        ("config", "Config", config_html),
    ]
    path = output_dir / REPORT_NAME
    atomic_write_bytes(
        path, _page(f"lora-monitor report - {output_dir.name}", header, sections).encode("utf-8")
    )
    return path
