"""report.html: content checks on a synthetic run, edge cases, and a real render in headless Chromium."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from lora_monitor.columns import COLUMNS, PREVIOUS_COLUMNS, STRENGTH_COLUMNS, STRENGTHS_CSV
from lora_monitor.evaluation.image_plan import build_plan
from lora_monitor.evaluation.prompts import Prompt
from lora_monitor.policies.best_checkpoint import best_record, choose_best
from lora_monitor.policies.early_stopping import OvertrainingStop
from lora_monitor.policies.overtraining import flag_rows
from lora_monitor.tracking.plan_record import PLAN_RECORD, read_plan_record, write_plan_record
from lora_monitor.tracking.report import REPORT_NAME, build_report, read_rows

CHROMIUM = Path("/usr/bin/chromium")
HEADER = list(PREVIOUS_COLUMNS)  # a CSV written before the signals and the baseline existed
PROMPTS = ["a photo of a red dress, sks style", 'a <b>red</b> dress & "quotes"', "a red dress on a beach"]
HOLDOUT = ["sks style, worn on a city street", "sks style, back view"]
SEEDS = 2
PLAN = build_plan([Prompt(p) for p in PROMPTS], [Prompt(h) for h in HOLDOUT], SEEDS, run_seed=1)
IMAGES = len(PROMPTS) * SEEDS + len(HOLDOUT)  # per checkpoint
CONFIG = '[kohya]\noutput_name = "demo"\n# <script>alert(1)</script>\n'
BASELINE_ROW = {"step": 0, "checkpoint": "baseline", "status": "baseline", "timestamp": "2026-03-01T09:58:00+00:00",
                "visual_loss": 0.95, "fashion_clip_loss": 0.85, "color_loss": 95.0, "clip_t": 0.19, "eval_score": 0.95,
                "clip_t_holdout": 0.25, "diversity": 0.3, "copy_distance": 0.45, "copies": 0, "eval_seconds": 1.2}
OK_STEPS = [25, 50, 75, 100, 125, 200, 225]  # 150 failed, 175 skipped
STRENGTHS = (0.5, 1.0)


def make_run(out: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A run folder: a baseline row then 9 checkpoints (one failed, one skipped, the last two copying a
    reference), the images of each evaluated one (3 prompts x 2 seeds + 2 held-out), eval/plan.json with 3
    reference images outside the output folder, and strengths.csv at two scales."""
    rows: list[dict[str, Any]] = [dict(BASELINE_ROW)]
    write_images(out / "eval" / "baseline", "baseline", 0, -1)
    for i in range(9):
        step = 25 * (i + 1)
        name = f"demo-step{step:08d}.safetensors"
        score = round(0.9 - 0.08 * i, 4)
        row: dict[str, Any] = {
            "step": step, "epoch": 1 + step // 100, "total_loss": round(0.3 - 0.01 * i, 4), "learning_rate": 3e-4,
            "timestamp": f"2026-03-01T10:{i * 2:02d}:00+00:00", "checkpoint": name, "status": "ok", "note": "",
            "eval_seconds": 1.5 + i * 0.1, "visual_loss": round(score + 0.05, 4),
            "fashion_clip_loss": round(score - 0.05, 4), "color_loss": round(90 - 8 * i, 2),
            "clip_t": round(0.2 + 0.01 * i, 4), "eval_score": score, "val_loss": round(0.2 - 0.005 * i, 4),
            "clip_t_holdout": round(0.25 - 0.002 * i, 4), "diversity": round(0.28 - 0.02 * i, 4),
            "copy_distance": round(0.40 - 0.035 * i, 4), "copies": 1 if i >= 7 else 0,
            "best_strength": 0.5 if i >= 3 else 1.0,
        }
        if step == 150:
            row.update(status="failed", note="CUDA out of memory <oom>", eval_score="", clip_t="", color_loss="",
                       diversity="", best_strength="")
        if step == 175:
            row.update(status="skipped", note="superseded", eval_score="", clip_t="", color_loss="", diversity="",
                       best_strength="")
        rows.append(row)
        if row["status"] == "ok":
            write_images(out / "eval" / Path(name).stem, name, step, i)
    # kohya's final file, the same weights as the last step's
    rows.append({**rows[-1], "checkpoint": "demo.safetensors", "status": "duplicate", "note": "same weights"})
    csv_path = out / "demo.csv"
    write_csv(csv_path, COLUMNS, rows)
    write_csv(out / STRENGTHS_CSV, STRENGTH_COLUMNS, [
        {"step": r["step"], "checkpoint": r["checkpoint"], "strength": s, "timestamp": r["timestamp"],
         **{k: r[k] for k in ("eval_score", "clip_t_holdout", "diversity", "copy_distance", "copies")},
         **({"eval_score": round(r["eval_score"] + 0.02, 4), "copies": 0} if s == 0.5 else {})}
        for r in rows if r["status"] == "ok" for s in STRENGTHS])
    references = []
    for k in range(3):
        references.append(out.parent / "refs" / f"ref{k}.png")
        references[-1].parent.mkdir(exist_ok=True)
        Image.new("RGB", (300 if k == 0 else 64, 64), (200, 20 * k, 30)).save(references[-1])
    write_plan_record(out, references, PLAN)
    return csv_path, rows


def write_csv(path: Path, columns: Any, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def write_images(folder: Path, name: str, step: int, i: int) -> None:
    """Dresses that turn from green to red with training, on white (64 px, like the demo task)."""
    folder.mkdir(parents=True)
    images = []
    for p in range(IMAGES):
        image = Image.new("RGB", (64, 64), "white")
        red = min(255, 60 + 40 * (i + 1))
        ImageDraw.Draw(image).polygon(
            [(32, 8), (18 + p * 2, 56), (46 - p * 2, 56)], fill=(red, 200 - 25 * (i + 1), 40)
        )
        image.save(folder / f"{p:02d}.png")
        images.append(f"{p:02d}.png")
    manifest = {"checkpoint": name, "step": step, "prompts": [q.text for q in PLAN.prompts], "images": images,
                "seeds": [q.seed for q in PLAN.prompts]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def build(out: Path, rows: list[dict[str, Any]], csv_path: Path) -> Path:
    """best.json and the over-training stop as the run's decisions make them."""
    cells = [{k: str(v) for k, v in r.items()} for r in rows]
    choice = choose_best(cells)
    assert choice.best is not None
    best = best_record(choice.best, choice.rule, choice.excluded)
    history = [(int(row["step"]), reasons) for row, reasons in flag_rows(cells)]
    stop, reason = OvertrainingStop(patience=2).decide(history)
    assert stop
    return build_report(out, csv_path, CONFIG, best, reason, {"training_s": 95.2, "total_s": 4000.0},
                        stop_step=history[-1][0])


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once (plots cost CPU); tests that change the folder build their own."""
    out = tmp_path_factory.mktemp("report") / "run"
    csv_path, rows = make_run(out)
    return build(out, rows, csv_path)


def section(text: str, name: str) -> str:
    start = text.index(f'<section id="{name}">')
    return text[start : text.index("</section>", start)]


def test_report_is_self_contained(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    assert report.name == REPORT_NAME
    assert "<script" not in text.lower() and "<link" not in text.lower()
    assert not re.search(r'(src|href)="(https?:)?//', text)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text  # config shown, escaped
    assert "&lt;b&gt;red&lt;/b&gt; dress &amp; &quot;quotes&quot;" in text  # prompt escaped
    assert not [p for p in report.parent.iterdir() if p.name.endswith(".tmp")]


def test_report_marks_best_and_early_stop(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    measured = ("visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score", "clip_t_holdout",
                "diversity", "copy_distance", "copies")
    for column in ("total_loss", "val_loss", *measured):
        for mark in ("curve", "best", "stop", "flagged"):
            assert f'id="{mark}-{column}"' in text, (mark, column)
    for column in measured:  # the base model's value as a line; kohya's losses have none for it
        assert f'id="baseline-{column}"' in text
    assert 'id="baseline-total_loss"' not in text and 'id="baseline-val_loss"' not in text
    assert 'id="curve-best_strength"' not in text  # a scale, not a curve
    assert "best (step 125)" in text and "early stop (step 225)" in text
    assert "over-trained for 2 evaluation(s) in a row" in text
    assert "demo-step00000125.safetensors (step 125)" in text
    assert '<th class=best title="demo-step00000125.safetensors">&#9733; best<br>demo-step00000125<br>' in text


def test_report_excluded_checkpoints(report: Path) -> None:
    summary = section(report.read_text(encoding="utf-8"), "summary")
    assert "<dt>excluded as over-trained</dt>" in summary and summary.count("<li>") == 2
    assert "demo-step00000200.safetensors (step 200, eval_score 0.34): copies 1 &gt; 0" in summary
    assert "<dt>checkpoints</dt><dd>10 (7 ok, 1 failed, 1 skipped, 1 duplicate)</dd>" in summary
    assert "<dt>baseline</dt><dd>evaluated" in summary
    table = section(report.read_text(encoding="utf-8"), "checkpoints")
    assert table.count('<tr class="ok flagged">') == 2 and '<tr class="baseline">' in table
    assert 'title="excluded as over-trained: copies 1 &gt; 0' in table


def test_report_against_baseline(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    table = section(text, "baseline")
    assert ">best (step 125)</th>" in table and ">last (step 225)</th>" in table
    row = {r.split("</th>")[0]: r for r in table.split("<tr><th>")[1:]}
    # diversity: baseline 0.3, best 0.2 (-33 %), last 0.12 (-60 %); higher is better
    assert '<td>0.3</td><td>0.2</td><td class="worse">-0.1 (-33 %)</td><td>0.12</td>' in row["diversity"]
    assert '<td class="better">-0.37 (-39 %)</td>' in row["eval_score"]  # 0.95 -> 0.58, lower is better
    assert '<td class="same">+0</td>' in row["copies"] and '<td class="worse">+1</td>' in row["copies"]
    assert "not measured" in row["val_loss"]  # kohya's validation has no base-model value
    checkpoints = section(text, "checkpoints")
    assert '<td title="vs baseline -0.1 (-33 %)">0.2</td>' in checkpoints  # best's diversity, on hover


def test_report_grid(report: Path) -> None:
    grid = section(report.read_text(encoding="utf-8"), "grid")
    head = grid[: grid.index("</thead>")]
    columns = re.findall(r"<th[ >][^>]*>", head)
    assert len(columns) == 2 + 1 + 9 + 1  # prompt, seed, baseline, the checkpoints, references
    assert "demo.safetensors" not in head  # a duplicate generated nothing: its twin's column shows the images
    assert columns[2] == '<th class=baseline title="baseline">' and columns[-1].startswith('<th class="refs"')
    assert "base model<br>no LoRA (baseline)<br>eval_score 0.95" in head
    assert head.count("class=flagged") == 2 and "over-trained</span>" in head
    main, holdout = grid.split('<tbody class="main">')[1].split('<tbody class="holdout">')
    assert main.count('<th class="prompt" rowspan="2">') == len(PROMPTS)  # a prompt heads its 2 seeds
    assert main.count("<tr>") == len(PROMPTS) * SEEDS and holdout.count("<tr>") == len(HOLDOUT)
    assert "held-out prompts" in holdout and all(h in holdout for h in HOLDOUT)
    assert not any(html.escape(p) in holdout for p in PROMPTS)
    assert '<td class="seed">1001</td>' in main  # prompt 1's second seed (first + 1000)
    generated = re.findall(r'href="(eval/[^"]+)"', grid)
    assert len(generated) == (1 + len(OK_STEPS)) * IMAGES
    assert all((report.parent / link).is_file() for link in generated)
    assert generated[0] == "eval/baseline/00.png"
    refs = grid[grid.index('<div class="refs"') :]
    refs = refs[: refs.index("</td>")]
    links = re.findall(r'href="([^"]+)"', refs)
    assert links == [f"../refs/ref{k}.png" for k in range(3)]
    assert all((report.parent / link).is_file() for link in links)
    assert refs.count("data:image/jpeg;base64,") == 1  # the 300 px reference: a JPEG thumbnail
    assert grid.count("data:image/png;base64,") == (1 + len(OK_STEPS)) * IMAGES + 2
    assert 'title="CUDA out of memory &lt;oom&gt;">failed</td>' in grid
    assert 'title="superseded">skipped</td>' in grid


def test_report_strengths(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    table = section(text, "strengths")
    assert "<th>strength 0.5</th><th>strength 1</th>" in table
    rows = table.split("<tr")[2:]
    assert rows[0].startswith(' class="baseline"') and "eval_score 0.95" in rows[0]
    assert len(rows) == 1 + len(OK_STEPS)
    assert table.count('class="best-strength"') == len(OK_STEPS)
    # step 25 prefers 1.0 (its last cell), step 225 prefers 0.5 (its first)
    first, last = rows[1], rows[-1]
    assert first.rindex("best-strength") > first.rindex("eval_score 0.92")
    assert "&#9733; best_strength<br><b>eval_score 0.28</b>" in last  # 0.26 + 0.02 at scale 0.5
    assert "copies 1" in last and "copy_distance 0.12" in last
    assert '<tr class="best"><th>demo-step00000125.safetensors</th>' in table
    assert table.count('<tr class="flagged"><th title="excluded as over-trained: copies 1 &gt; 0') == 2


def test_report_tables_and_timings(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    table = section(text, "checkpoints")
    assert table.count('<tr class="failed">') == 1 and '<tr class="ok best">' in table
    assert '<td title="CUDA out of memory &lt;oom&gt;">failed</td>' in table
    timings = section(text, "timings")
    for expected in (
        "training</th><td>1 min 35 s",
        "total</th><td>1 h 06 min",
        "evaluation, all checkpoints",
    ):
        assert expected in timings
    assert "first to last evaluated row</th><td>18 min 00 s" in timings


def test_plan_record_round_trip(tmp_path: Path) -> None:
    refs = [tmp_path / "a.png", tmp_path / "sub" / ".." / "b.png"]
    write_plan_record(tmp_path, refs, PLAN)
    record = read_plan_record(tmp_path)
    assert record is not None
    assert record.references == (tmp_path / "a.png", tmp_path / "b.png")
    assert record.order == tuple((q.text, q.seed) for q in PLAN.prompts)
    assert [record.kinds[k] for k in record.order] == list(PLAN.kinds)
    assert not [p for p in (tmp_path / "eval").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("content", [None, "{not json", "[1, 2]", '{"references": [3, ""], "images": [{"seed": 1}]}'])
def test_plan_record_unreadable(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / "eval").mkdir()
        (tmp_path / "eval" / PLAN_RECORD).write_text(content)
    record = read_plan_record(tmp_path)
    assert record is None or (record.references == () and record.order == ())


@pytest.mark.parametrize("content", ["", ",".join(HEADER) + "\n", None])
def test_report_without_rows(tmp_path: Path, content: str | None) -> None:
    csv_path = tmp_path / "run.csv"
    if content is not None:
        csv_path.write_text(content)
    path = build_report(tmp_path, csv_path, None, None)
    text = path.read_text(encoding="utf-8")
    assert "<svg" not in text
    assert "No evaluated checkpoint with a known step yet." in text
    assert "No generated images found under eval/." in text
    assert "No checkpoint has been evaluated yet." in text
    assert "<dt>best</dt><dd>none yet</dd>" in text


def test_report_all_failed(tmp_path: Path) -> None:
    csv_path = tmp_path / "run.csv"
    lines = [
        ",".join(HEADER),
        "10,1,0.25,,,,,2026-03-01T10:00:00+00:00,a-step10.safetensors,,,failed,boom,0.5",
    ]
    csv_path.write_text("\n".join(lines) + "\n")
    text = build_report(tmp_path, csv_path, "x = 1", None).read_text(encoding="utf-8")
    assert 'id="curve-total_loss"' in text  # the trainer's loss is still known
    assert 'id="curve-eval_score"' not in text
    assert '<tr class="failed">' in text and "boom" in text


def test_bad_manifests_are_skipped(tmp_path: Path) -> None:
    csv_path = tmp_path / "run.csv"
    lines = [",".join(HEADER)] + [
        f"{s},1,0.2,0.5,0.5,40,,2026-03-01T10:00:00+00:00,a-{s}.safetensors,0.2,0.5,ok,,1" for s in (1, 2, 3)
    ]
    csv_path.write_text("\n".join(lines) + "\n")
    (tmp_path / "secret.png").write_bytes(b"")
    for stem, manifest in [
        ("a-1", '{"images": ["../../secret.png", "/etc/passwd"], "prompts": ["p", "q"]}'),
        ("a-2", "{not json"),
        ("a-3", '{"images": ["00.png", "01.png"], "prompts": ["p"]}'),
    ]:
        (tmp_path / "eval" / stem).mkdir(parents=True)
        (tmp_path / "eval" / stem / "manifest.json").write_text(manifest)
    Image.new("RGB", (300, 200), "red").save(tmp_path / "eval" / "a-3" / "00.png")
    (tmp_path / "eval" / "a-3" / "01.png").write_bytes(b"not a png")
    text = build_report(tmp_path, csv_path, None, None).read_text(encoding="utf-8")
    assert "secret" not in text and "passwd" not in text
    assert text.count("data:image/jpeg;base64,") == 1  # 300 px: shrunk to a JPEG thumbnail
    assert 'width="128" height="85"' in text
    assert ">prompt 2</th>" in text and ">missing</td>" in text
    assert "Reference images and held-out prompts: not recorded for this run" in text  # no eval/plan.json
    assert '<th class="refs"' not in text and '<tbody class="holdout">' not in text


def test_report_replaces_old_one(tmp_path: Path) -> None:
    out = tmp_path / "run"
    csv_path, _ = make_run(out)
    report = out / REPORT_NAME
    report.write_text("old")
    path = build_report(out, csv_path, None, None)
    assert path == report and "LoRA training report" in report.read_text(encoding="utf-8")
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_read_rows_types(report: Path) -> None:
    frame = read_rows(report.parent / "demo.csv")
    assert list(frame["step"]) == [0, 25, 50, 75, 100, 125, 150, 175, 200, 225, 225]
    assert frame.loc[0, "status"] == "baseline" and frame.loc[0, "diversity"] == 0.3
    assert frame["eval_score"].isna().sum() == 2
    assert frame.loc[frame["status"] == "failed", "note"].item() == "CUDA out of memory <oom>"


def chromium(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    argv = [
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={home / 'profile'}", "--window-size=1200,2000", *args,
    ]  # fmt: skip
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env, check=False)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)")
def test_report_renders_in_chromium(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "shot.png"
    url = report.resolve().as_uri()
    done = chromium([f"--screenshot={shot}", url], tmp_path)
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 2000)
        gray = image.convert("L")
        dark = sum(gray.histogram()[:200])
        assert dark > 0.02 * 1200 * 2000, "screenshot is (almost) blank"
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 50
    dom = chromium(["--dump-dom", url], tmp_path).stdout
    curves = dom[dom.index('<section id="curves">') : dom.index('<section id="grid">')]
    assert curves.count("<svg") == 1 and 'id="curve-eval_score"' in curves and 'id="stop-clip_t"' in curves
    assert 'id="baseline-diversity"' in curves and 'id="curve-copy_distance"' in curves
    grid = dom[dom.index('<section id="grid">') : dom.index('<section id="strengths">')]
    assert grid.count("<img") == (1 + len(OK_STEPS)) * IMAGES + 3  # the references too
    assert 'class="best"' in grid and 'class="holdout"' in grid
    strengths = dom[dom.index('<section id="strengths">') : dom.index('<section id="checkpoints">')]
    assert strengths.count('class="best-strength"') == len(OK_STEPS)
