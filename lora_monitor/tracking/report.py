"""One self-contained `report.html` per run: curves, image grid, checkpoint table, timings and config.

The page opens from disk with no server and no network: plots are inline SVG, thumbnails are embedded as
data URIs, and only the "full size" links point elsewhere (relative paths into the run's eval/ folder).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from lora_monitor.columns import LOSS_KEYS, MONITORABLE
from lora_monitor.policies.best_checkpoint import atomic_write_bytes
from lora_monitor.run_spec import eval_folder

REPORT_NAME = "report.html"
THUMB_PX = 128  # longest side of an embedded thumbnail, pixels
TEXT_COLUMNS = ("timestamp", "checkpoint", "status", "note")
NOT_CURVES = {"step", "epoch", "eval_seconds", "learning_rate", *TEXT_COLUMNS}
# Panels in this order first; any other numeric column (a metric added later) follows.
CURVE_ORDER = ("total_loss", "eval_score", *LOSS_KEYS,
               *(m for m in MONITORABLE if m not in (*LOSS_KEYS, "total_loss", "eval_score")))
LABELS = {"total_loss": "training loss (total_loss)", "learning_rate": "learning rate"}


@dataclass(frozen=True)
class _Marks:
    """Steps to mark on every curve; None when unknown."""

    best_step: int | None
    stop_step: int | None


def read_rows(csv_path: Path) -> pd.DataFrame:
    """The run's CSV with numeric columns as floats (NaN = unknown); an absent or empty file gives no rows."""
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


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _curve_columns(frame: pd.DataFrame) -> list[str]:
    numeric = [c for c in frame.columns if c not in NOT_CURVES and frame[c].notna().any()]
    ordered = [c for c in CURVE_ORDER if c in numeric] + sorted(c for c in numeric if c not in CURVE_ORDER)
    if "learning_rate" in frame.columns and frame["learning_rate"].notna().any():
        ordered.append("learning_rate")
    return ordered


def _title(column: str) -> str:
    direction = {"min": " - lower is better", "max": " - higher is better"}.get(
        MONITORABLE.get(column, ""), ""
    )
    return LABELS.get(column, column) + direction


GREEN, RED, BLUE = "#2e8b57", "#c0392b", "#3b6ea8"


def _draw_panel(ax: Any, frame: pd.DataFrame, column: str, marks: _Marks) -> None:
    """One metric vs step; gids (curve-/best-/stop-<column>) become element ids in the SVG."""
    known = frame[frame["step"].notna()]
    # The trainer's own values are valid at every evaluated step, whatever became of the evaluation.
    points = known if column in ("total_loss", "learning_rate") else known[known["status"] == "ok"]
    points = points[points[column].notna()]
    ax.plot(points["step"], points[column], "o-", color=BLUE, ms=3.5, lw=1.4, gid=f"curve-{column}")
    failed = known[known["status"] == "failed"]
    if len(failed):  # along the bottom edge: a failed evaluation has no value to place
        bottom = ax.get_xaxis_transform()
        ax.plot(
            failed["step"], [0.03] * len(failed), "x", color=RED, ms=6, transform=bottom, label="eval failed"
        )
    if marks.best_step is not None:
        label = f"best (step {marks.best_step})"
        ax.axvline(marks.best_step, color=GREEN, lw=1.2, label=label, gid=f"best-{column}")
        at_best = points[points["step"] == marks.best_step]
        ax.plot(at_best["step"], at_best[column], "*", color=GREEN, ms=13)
    if marks.stop_step is not None:
        label = f"early stop (step {marks.stop_step})"
        ax.axvline(marks.stop_step, color=RED, ls="--", lw=1.2, label=label, gid=f"stop-{column}")
    ax.set_title(_title(column), fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)


def curves_svg(frame: pd.DataFrame, marks: _Marks) -> str | None:
    """Every curve vs step as one inline <svg> (matplotlib, no pyplot state); None when nothing to plot."""
    columns = _curve_columns(frame)
    if not columns or frame["step"].notna().sum() == 0:
        return None
    ncols = 1 if len(columns) == 1 else 2
    nrows = math.ceil(len(columns) / ncols)
    figure = Figure(figsize=(11, 2.9 * nrows), layout="constrained")
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, column in zip(axes, columns, strict=False):
        _draw_panel(ax, frame, column, marks)
    for ax in axes[len(columns) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, fontsize=8, loc="best")
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and DOCTYPE so it nests in HTML


def _thumbnail(path: Path) -> tuple[str, int, int] | None:
    """(data URI, width, height) of an image, its longest side at most THUMB_PX; None if unreadable."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            small = max(image.size) <= THUMB_PX
            if not small:
                image.thumbnail((THUMB_PX, THUMB_PX))
            buffer = io.BytesIO()
            # Small images as lossless PNG (tiny anyway); larger ones as JPEG to keep the page light.
            image.save(buffer, format="PNG" if small else "JPEG", quality=85)
            kind = "png" if small else "jpeg"
            width, height = image.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return f"data:image/{kind};base64,{base64.b64encode(buffer.getvalue()).decode()}", width, height


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("images"), list) else None


def _safe_name(name: Any) -> bool:
    """A plain file name inside the checkpoint's eval folder (the manifest must not point elsewhere)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _grid_cells(output_dir: Path, stem: str) -> dict[str, str]:
    """prompt -> <td> for one checkpoint's images."""
    manifest = _manifest(eval_folder(output_dir, stem))
    if manifest is None:
        return {}
    prompts = manifest.get("prompts") if isinstance(manifest.get("prompts"), list) else []
    cells: dict[str, str] = {}
    for index, name in enumerate(manifest["images"]):
        prompt = str(prompts[index]) if index < len(prompts) else f"prompt {index + 1}"
        if not _safe_name(name) or prompt in cells:
            continue
        thumb = _thumbnail(eval_folder(output_dir, stem) / name)
        if thumb is None:
            cells[prompt] = '<td class="missing" title="image missing or unreadable">missing</td>'
            continue
        uri, width, height = thumb
        href = f"eval/{quote(stem)}/{quote(name)}"
        alt = html.escape(f"{stem} - {prompt}")
        cells[prompt] = (
            f'<td><a href="{href}" title="full size"><img src="{uri}" width="{width}" height="{height}" '
            f'alt="{alt}"></a></td>'
        )
    return cells


def _grid_head(row: pd.Series, best: bool) -> str:
    """Column heading: checkpoint stem (full name on hover), step, eval_score, status when not ok."""
    name = str(row["checkpoint"])
    lines = ["&#9733; best"] if best else []
    lines += [html.escape(Path(name).stem), f"step {_fmt(row['step']) or '?'}"]
    if score := _fmt(row.get("eval_score")):
        lines.append(f"eval_score {score}")
    if row["status"] != "ok":
        lines.append(html.escape(str(row["status"])))
    return f'<th{" class=best" if best else ""} title="{html.escape(name)}">{"<br>".join(lines)}</th>'


def grid_html(output_dir: Path, frame: pd.DataFrame, best_name: str | None) -> str:
    """A prompts x checkpoints table of thumbnails, each linking to its full-size image."""
    columns: list[tuple[pd.Series, dict[str, str]]] = []
    seen: set[str] = set()
    for _, row in frame.iterrows():
        name = str(row["checkpoint"])
        if not name or name in seen:
            continue
        seen.add(name)
        columns.append((row, _grid_cells(output_dir, Path(name).stem)))
    prompts = list(dict.fromkeys(p for _, cells in columns for p in cells))
    if not prompts:
        return '<p class="empty">No generated images found under eval/.</p>'
    head = ['<th class="prompt">prompt</th>'] + [
        _grid_head(row, row["checkpoint"] == best_name) for row, _ in columns
    ]
    body = []
    for prompt in prompts:
        cells = [f'<th class="prompt">{html.escape(prompt)}</th>']
        for row, by_prompt in columns:
            status = "no image" if row["status"] == "ok" else str(row["status"] or "no image")
            note = html.escape(str(row.get("note", "") or status))
            cells.append(
                by_prompt.get(prompt, f'<td class="missing" title="{note}">{html.escape(status)}</td>')
            )
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="scroll"><table class="grid"><thead><tr>{"".join(head)}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>"
    )


def _checkpoint_table(frame: pd.DataFrame, best_name: str | None) -> str:
    if frame.empty:
        return '<p class="empty">No checkpoint has been evaluated yet.</p>'
    # The note (why an evaluation failed) before the long timestamp, so it shows without scrolling.
    wanted = [
        "checkpoint",
        "step",
        "epoch",
        "status",
        *_curve_columns(frame),
        "eval_seconds",
        "note",
        "timestamp",
    ]
    columns = list(dict.fromkeys(c for c in wanted if c in frame.columns))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for _, row in frame.iterrows():
        classes = [str(row["status"])] + (["best"] if row["checkpoint"] == best_name else [])
        note = _fmt(row.get("note", ""))
        cells = ""
        for column in columns:
            # The status cell carries the note on hover: the note column itself may be scrolled out of view.
            title = f' title="{html.escape(note)}"' if column == "status" and note else ""
            cells += f"<td{title}>{html.escape(_fmt(row[column]))}</td>"
        rows.append(f'<tr class="{html.escape(" ".join(classes))}">{cells}</tr>')
    return (
        f'<div class="scroll"><table class="rows"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


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
    counts = frame["status"].replace("", "unknown").value_counts() if len(frame) else pd.Series(dtype=int)
    status = ", ".join(f"{count} {name}" for name, count in counts.items()) or "none yet"
    items = [f"<dt>checkpoints</dt><dd>{len(frame)} ({html.escape(status)})</dd>"]
    if best and best.get("checkpoint") is None:  # best.json: every checkpoint flagged as over-trained
        items.append(f'<dt>best</dt><dd class="stop">none: {html.escape(str(best.get("rule") or ""))}</dd>')
    elif best:
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in (best.get("metrics") or {}).items())
        items.append(
            f'<dt>best</dt><dd class="best-text">{html.escape(str(best.get("checkpoint", "?")))} '
            f"(step {html.escape(_fmt(best.get('step')) or '?')})"
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
        f"<li>{html.escape(str(e.get('checkpoint', '?')))} (step {html.escape(_fmt(e.get('step')) or '?')}, "
        f"eval_score {html.escape(_fmt(e.get('eval_score')) or '?')}): "
        f"{html.escape('; '.join(map(str, e.get('reasons') or [])))}</li>"
        for e in best.get("excluded") or []
    ]
    out = f"<dt>excluded as over-trained</dt><dd><ul class=excluded>{''.join(entries)}</ul></dd>" if entries else ""
    if best.get("flags"):
        out += f'<dt>best is flagged</dt><dd class="stop">{html.escape("; ".join(map(str, best["flags"])))}</dd>'
    return out


def _marks(frame: pd.DataFrame, best: dict[str, Any] | None, stop_step: int | None) -> _Marks:
    best_step = None
    if best:
        step = best.get("step")
        if isinstance(step, int | float) and not isinstance(step, bool) and math.isfinite(step):
            best_step = int(step)
        else:
            match = frame[(frame["checkpoint"] == best.get("checkpoint")) & frame["step"].notna()]
            best_step = int(match["step"].iloc[0]) if len(match) else None
    return _Marks(best_step, stop_step)


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
th{text-align:left}
table.grid th{font-weight:normal;font-size:12px;text-align:center;min-width:112px;white-space:nowrap}
table.grid th.best{background:#e8f5ec;outline:2px solid #2e8b57}
table.grid th.prompt{text-align:left;max-width:220px;min-width:140px;white-space:normal}
table.grid td{text-align:center;padding:2px}table.grid td.missing{color:#aaa;vertical-align:middle}
table.grid img{width:112px;height:auto;image-rendering:pixelated;display:block;margin:0 auto}
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
        ("curves", "Curves", svg or '<p class="empty">No evaluated checkpoint with a known step yet.</p>'),
        (
            "grid",
            "Images (prompts x checkpoints; click for full size)",
            grid_html(output_dir, frame, best_name),
        ),
        ("checkpoints", "Checkpoints", _checkpoint_table(frame, best_name)),
        ("timings", "Timings", timing_html),
        ("config", "Config", config_html),
    ]
    path = output_dir / REPORT_NAME
    atomic_write_bytes(
        path, _page(f"lora-monitor report - {output_dir.name}", header, sections).encode("utf-8")
    )
    return path
