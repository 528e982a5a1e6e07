"""The report's image grid: one row per (prompt, seed), one column per checkpoint; the base model's images
first, the reference (training) images last; held-out prompts in their own group below the evaluation prompts.

Thumbnails are embedded as data URIs (the page stands alone); each links to its full-size file by a relative
path. Which prompts are held out and which images were the references comes from eval/plan.json.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from PIL import Image

from lora_monitor.columns import BASELINE
from lora_monitor.evaluation.image_plan import HOLDOUT
from lora_monitor.run_spec import eval_folder
from lora_monitor.tracking.plan_record import PLAN_RECORD, PlanRecord, read_plan_record
from lora_monitor.tracking.report_tables import fmt

THUMB_PX = 128  # longest side of an embedded thumbnail, pixels
MAX_REFERENCES = 24  # reference thumbnails shown; the rest are counted
Key = tuple[str, int | None]  # (prompt, seed): one row of the grid


def thumbnail(path: Path) -> tuple[str, int, int] | None:
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


def _img(path: Path, href: str, alt: str) -> str | None:
    thumb = thumbnail(path)
    if thumb is None:
        return None
    uri, width, height = thumb
    return (f'<a href="{href}" title="full size"><img src="{uri}" width="{width}" height="{height}" '
            f'alt="{html.escape(alt)}"></a>')


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("images"), list) else None


def _safe_name(name: Any) -> bool:
    """A plain file name inside the checkpoint's eval folder (the manifest must not point elsewhere)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _listed(data: dict[str, Any], key: str) -> list[Any]:
    return data[key] if isinstance(data.get(key), list) else []


def _cells(output_dir: Path, stem: str) -> dict[Key, str]:
    """(prompt, seed) -> <td> for one checkpoint's images."""
    folder = eval_folder(output_dir, stem)
    manifest = _manifest(folder)
    if manifest is None:
        return {}
    prompts, seeds = _listed(manifest, "prompts"), _listed(manifest, "seeds")
    cells: dict[Key, str] = {}
    for index, name in enumerate(manifest["images"]):
        prompt = str(prompts[index]) if index < len(prompts) else f"prompt {index + 1}"
        seed = seeds[index] if index < len(seeds) and isinstance(seeds[index], int) else None
        if not _safe_name(name) or (prompt, seed) in cells:
            continue
        image = _img(folder / name, f"eval/{quote(stem)}/{quote(name)}", f"{stem} - {prompt}")
        cells[(prompt, seed)] = (f"<td>{image}</td>" if image
                                 else '<td class="missing" title="image missing or unreadable">missing</td>')
    return cells


def _head(row: pd.Series, best: bool, flags: list[str] | None) -> str:
    """Column heading: checkpoint stem (full name on hover), step, eval_score, status when not ok."""
    name = str(row["checkpoint"])
    if row["status"] == BASELINE:
        lines = ["base model", "no LoRA (baseline)"]
    else:
        lines = (["&#9733; best"] if best else []) + [html.escape(Path(name).stem), f"step {fmt(row['step']) or '?'}"]
    if score := fmt(row.get("eval_score")):
        lines.append(f"eval_score {score}")
    if row["status"] not in ("ok", BASELINE):
        lines.append(html.escape(str(row["status"])))
    title = name
    if flags:
        lines.append('<span class="flag">over-trained</span>')
        title += ": excluded as over-trained: " + "; ".join(flags)
    kind = "best" if best else "baseline" if row["status"] == BASELINE else "flagged" if flags else ""
    return f'<th{f" class={kind}" if kind else ""} title="{html.escape(title)}">{"<br>".join(lines)}</th>'


def _columns(output_dir: Path, frame: pd.DataFrame) -> list[tuple[pd.Series, dict[Key, str]]]:
    """(row, cells) per checkpoint with a name: the baseline first, then by step. A duplicate (the same weights
    as an evaluated file, e.g. kohya's final file) generated nothing: its twin's column shows its images."""
    ordered = pd.concat([frame[frame["status"] == BASELINE],
                         frame[~frame["status"].isin([BASELINE, "duplicate"])]])
    columns: list[tuple[pd.Series, dict[Key, str]]] = []
    seen: set[str] = set()
    for _, row in ordered.iterrows():
        name = str(row["checkpoint"])
        if name and name not in seen:
            seen.add(name)
            columns.append((row, _cells(output_dir, Path(name).stem)))
    return columns


def _row_order(columns: list[tuple[pd.Series, dict[Key, str]]], plan: PlanRecord | None) -> list[Key]:
    """The plan's order, then keys the plan lacks; a prompt's seeds kept together."""
    keys = list(dict.fromkeys([*(plan.order if plan else ()), *(k for _, cells in columns for k in cells)]))
    present = {k for _, cells in columns for k in cells}
    by_prompt: dict[str, list[Key]] = {}
    for key in keys:
        if key in present:
            by_prompt.setdefault(key[0], []).append(key)
    return [k for group in by_prompt.values() for k in group]


def _references(output_dir: Path, plan: PlanRecord | None, rows: int) -> tuple[str, str]:
    """(heading, cell content) of the reference column."""
    if plan is None or not plan.references:
        return "", ""
    images = []
    for path in plan.references[:MAX_REFERENCES]:
        try:
            href = quote(Path(os.path.relpath(path, output_dir)).as_posix())
        except ValueError:  # another drive (Windows): no relative path
            href = path.as_uri()
        images.append(_img(path, href, f"reference {path.name}")
                      or f'<span class="missing" title="{html.escape(str(path))}">missing</span>')
    more = len(plan.references) - MAX_REFERENCES
    if more > 0:
        images.append(f'<span class="more">+{more} more</span>')
    per_line = max(1, min(4, math.ceil(len(images) / max(rows, 1))))
    head = f'<th class="refs" title="the images the metrics compare with">references<br>{len(plan.references)} ' \
           "training image(s)</th>"
    return head, f'<div class="refs" style="max-width:{per_line * 116}px">{"".join(images)}</div>'


def _body_rows(keys: list[Key], columns: list[tuple[pd.Series, dict[Key, str]]]) -> list[str]:
    """One <tr> per key; a prompt's heading spans its seeds."""
    rows = []
    for i, key in enumerate(keys):
        prompt, seed = key
        cells = []
        if not i or keys[i - 1][0] != prompt:
            span = next((n for n, k in enumerate(keys[i:]) if k[0] != prompt), len(keys) - i)
            cells.append(f'<th class="prompt" rowspan="{span}">{html.escape(prompt)}</th>')
        cells.append(f'<td class="seed">{"" if seed is None else seed}</td>')
        for row, by_key in columns:
            status = "no image" if row["status"] in ("ok", BASELINE) else str(row["status"] or "no image")
            note = html.escape(str(row.get("note", "") or status))
            cells.append(by_key.get(key, f'<td class="missing" title="{note}">{html.escape(status)}</td>'))
        rows.append(cells)
    return ["".join(cells) for cells in rows]


def grid_html(output_dir: Path, frame: pd.DataFrame, best_name: str | None, flags: dict[str, list[str]]) -> str:
    """The image grid: prompts (and seeds) x checkpoints, baseline first, references last."""
    plan = read_plan_record(output_dir)
    columns = _columns(output_dir, frame)
    keys = _row_order(columns, plan)
    if not keys:
        return '<p class="empty">No generated images found under eval/.</p>'
    held_out = {k for k in keys if plan and plan.kinds.get(k) == HOLDOUT}
    groups = [(g, rows) for g, rows in (("evaluation prompts (the metrics and diversity)",
                                         [k for k in keys if k not in held_out]),
                                        ("held-out prompts: contexts the captions never had (clip_t_holdout)",
                                         [k for k in keys if k in held_out])) if rows]
    ref_head, ref_cell = _references(output_dir, plan, len(groups[0][1]))
    width = 2 + len(columns) + bool(ref_head)
    head = ['<th class="prompt">prompt</th><th class="seed">seed</th>']
    head += [_head(row, row["checkpoint"] == best_name, flags.get(str(row["checkpoint"]))) for row, _ in columns]
    tbodies = []
    for number, (title, group) in enumerate(groups):
        rows = _body_rows(group, columns)
        if ref_head:  # the references span the first group's rows; later groups leave the column empty
            rows[0] += (f'<td class="refs" rowspan="{len(rows)}">{ref_cell}</td>' if number == 0
                        else f'<td class="refs" rowspan="{len(rows)}"></td>')
        label = f'<tr class="group"><th colspan="{width}">{html.escape(title)}</th></tr>' if len(groups) > 1 else ""
        tbodies.append(f'<tbody class="{"holdout" if number else "main"}">{label}'
                       f"{''.join(f'<tr>{r}</tr>' for r in rows)}</tbody>")
    note = ("" if plan else f'<p class="empty">Reference images and held-out prompts: not recorded for this run '
            f"(eval/{PLAN_RECORD} is written when evaluation starts).</p>")
    return (f'<div class="scroll"><table class="grid"><thead><tr>{"".join(head)}{ref_head}</tr></thead>'
            f"{''.join(tbodies)}</table></div>{note}")
