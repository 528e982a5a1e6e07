"""report.html: content checks on a synthetic run, edge cases, and a real render in headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from lora_monitor.policies.best_checkpoint import best_record, select_best
from lora_monitor.policies.early_stopping import EarlyStopping
from lora_monitor.tracking.report import REPORT_NAME, build_report, read_rows

CHROMIUM = Path("/usr/bin/chromium")
HEADER = (
    "step,epoch,total_loss,visual_loss,fashion_clip_loss,color_loss,learning_rate,timestamp,checkpoint,"
    "clip_t,eval_score,status,note,eval_seconds"
).split(",")
PROMPTS = ["a photo of a red dress, sks style", 'a <b>red</b> dress & "quotes"', "a red dress on a beach"]
CONFIG = '[kohya]\noutput_name = "demo"\n# <script>alert(1)</script>\n'


def make_run(out: Path) -> tuple[Path, list[dict[str, Any]]]:
    """A run folder with a CSV of 9 checkpoints (one failed, one skipped) and 3 images each where scored."""
    rows: list[dict[str, Any]] = []
    for i, step in enumerate(range(0, 225, 25)):
        name = f"demo-step{step:08d}.safetensors"
        score = 0.9 - 0.1 * i if i < 5 else 0.45 + 0.03 * (i - 5)
        row: dict[str, Any] = {
            "step": step,
            "epoch": 1 + step // 100,
            "total_loss": round(0.3 - 0.01 * i, 4),
            "learning_rate": 3e-4,
            "timestamp": f"2026-03-01T10:{i * 2:02d}:00+00:00",
            "checkpoint": name,
            "status": "ok",
            "note": "",
            "eval_seconds": 1.5 + i * 0.1,
            "visual_loss": round(score + 0.05, 4),
            "fashion_clip_loss": round(score - 0.05, 4),
            "color_loss": round(90 - 8 * i, 2),
            "clip_t": round(0.2 + 0.01 * i, 4),
            "eval_score": round(score, 4),
        }
        if step == 125:
            row.update(
                status="failed", note="CUDA out of memory <oom>", eval_score="", clip_t="", color_loss=""
            )
        if step == 150:
            row.update(status="skipped", note="superseded", eval_score="", clip_t="", color_loss="")
        rows.append(row)
        if row["status"] == "ok":
            write_images(out / "eval" / Path(name).stem, name, step, i)
    csv_path = out / "demo.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return csv_path, rows


def write_images(folder: Path, name: str, step: int, i: int) -> None:
    """Dresses that turn from green to red with training, on white (64 px, like the demo task)."""
    folder.mkdir(parents=True)
    images = []
    for p in range(len(PROMPTS)):
        image = Image.new("RGB", (64, 64), "white")
        red = min(255, 60 + 40 * i)
        ImageDraw.Draw(image).polygon(
            [(32, 8), (18 + p * 2, 56), (46 - p * 2, 56)], fill=(red, 200 - 25 * i, 40)
        )
        image.save(folder / f"{p:02d}.png")
        images.append(f"{p:02d}.png")
    manifest = {"checkpoint": name, "step": step, "prompts": PROMPTS, "images": images, "seeds": [1, 2, 3]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def build(out: Path, rows: list[dict[str, Any]], csv_path: Path) -> Path:
    es = EarlyStopping(patience=2)
    history = [(int(r["step"]), float(r["eval_score"])) for r in rows if r["status"] == "ok"]
    stop, reason = es.decide(history)
    assert stop
    best_row = select_best([{k: str(v) for k, v in r.items()} for r in rows], "eval_score", "min")
    assert best_row is not None
    best = best_record(best_row, "lowest eval_score among ok checkpoints")
    return build_report(out, csv_path, CONFIG, best, reason, {"training_s": 95.2, "total_s": 4000.0},
                        stop_step=history[-1][0])


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once (plots cost CPU); tests that change the folder build their own."""
    out = tmp_path_factory.mktemp("report") / "run"
    csv_path, rows = make_run(out)
    return build(out, rows, csv_path)


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
    for column in ("total_loss", "eval_score", "visual_loss", "fashion_clip_loss", "color_loss", "clip_t"):
        assert f'id="curve-{column}"' in text
        assert f'id="best-{column}"' in text
        assert f'id="stop-{column}"' in text
    assert "best (step 100)" in text and "early stop (step 200)" in text
    assert "early stop at step 200" in text
    assert "demo-step00000100.safetensors (step 100)" in text
    assert (
        '<th class=best title="demo-step00000100.safetensors">&#9733; best<br>demo-step00000100<br>' in text
    )


def test_report_grid_and_tables(report: Path) -> None:
    text = report.read_text(encoding="utf-8")
    grid = text[text.index('<section id="grid">') : text.index('<section id="checkpoints">')]
    assert grid.count("<tr>") == 1 + len(PROMPTS)
    assert grid.count("data:image/png;base64,") == 7 * len(PROMPTS)  # 9 rows, one failed, one skipped
    links = re.findall(r'href="(eval/[^"]+)"', grid)
    assert len(links) == 7 * len(PROMPTS)
    assert all((report.parent / link).is_file() for link in links)
    assert 'title="CUDA out of memory &lt;oom&gt;">failed</td>' in grid
    assert 'title="superseded">skipped</td>' in grid
    table = text[text.index('<section id="checkpoints">') : text.index('<section id="timings">')]
    assert table.count('<tr class="failed">') == 1 and '<tr class="ok best">' in table
    assert '<td title="CUDA out of memory &lt;oom&gt;">failed</td>' in table
    timings = text[text.index('<section id="timings">') : text.index('<section id="config">')]
    for expected in (
        "training</th><td>1 min 35 s",
        "total</th><td>1 h 06 min",
        "evaluation, all checkpoints",
    ):
        assert expected in timings
    assert "first to last evaluated row</th><td>16 min 00 s" in timings


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
    assert list(frame["step"]) == [0, 25, 50, 75, 100, 125, 150, 175, 200]
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
    grid = dom[dom.index('<section id="grid">') : dom.index('<section id="checkpoints">')]
    assert grid.count("<img") == 7 * len(PROMPTS)
    assert 'class="best"' in grid
