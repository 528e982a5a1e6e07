"""[eval] source = "kohya_samples" for real: the demo trainer samples as kohya does, `train` scores its images
live, and `eval-dir --watch` scores a sample/ folder replayed into place file by file."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pandas as pd

from tests.conftest import cli, run_demo_trainer, start_cli, write_config

# Two seeds of one prompt (diversity) and a second prompt; tiny images, few steps (kohya's defaults are 512 px,
# 30 steps).
PROMPTS = ("a red dress --w 64 --h 64 --s 4 --l 1.0 --d 1\n"
           "a red dress --w 64 --h 64 --s 4 --l 1.0 --d 2\n"
           "# a comment line kohya skips\n"
           "a dress on a hanger --w 64 --h 64 --s 4 --l 1.0 --d 3\n")
SAMPLING = {"sample_every_n_steps": 10, "sample_at_first": True, "save_every_n_steps": 20, "max_train_steps": 40}


def _prompts(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sample_prompts.txt"
    path.write_text(PROMPTS, encoding="utf-8")
    return path


def _check_rows(out: Path, rows: pd.DataFrame) -> None:
    """Every sampling has a row: the baseline from kohya's e000000 images, first, each step's named after its LoRA
    when kohya saved one there; the signals that apply are filled, clip_t_holdout is not. The rows after the
    baseline are in evaluation order, newest waiting first when scoring falls behind kohya: compared by step."""
    assert rows["checkpoint"].iloc[0] == "baseline"
    rows = rows.sort_values("step", kind="stable").reset_index(drop=True)
    assert list(rows["checkpoint"]) == ["baseline", "sample@step 10", "demo_dress-step00000020.safetensors",
                                        "sample@step 30", "demo_dress-step00000040.safetensors"]
    assert list(rows["status"]) == ["baseline", "ok", "ok", "ok", "ok"]
    assert list(rows["step"]) == [0, 10, 20, 30, 40]
    assert rows[["eval_score", "clip_t", "diversity", "copy_distance", "copies"]].notna().all().all()
    assert rows["clip_t_holdout"].isna().all()
    assert rows["total_loss"].iloc[1:].notna().all()
    first = sorted((out / "sample").glob("demo_dress_e000000_00_*_1.png"))
    assert (out / "eval" / "baseline" / "00.png").read_bytes() == first[-1].read_bytes()  # kohya's image, scored
    assert len(list((out / "eval" / "demo_dress-step00000020").glob("*.png"))) == 3


def test_train_scores_kohyas_own_samples(tmp_path: Path, demo_assets) -> None:
    prompts = _prompts(tmp_path)
    config = write_config(tmp_path, demo_assets, kohya={**SAMPLING, "sample_prompts": str(prompts)},
                          eval_={"source": "kohya_samples"})
    result = cli("train", "--config", str(config), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "output"
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert len(names) == 5 * 3 and names[0].startswith("demo_dress_000010_00_") and names[0].endswith("_1.png")
    _check_rows(out, pd.read_csv(out / "loss_tracker.csv"))


def test_eval_dir_scores_a_replayed_sample_folder(tmp_path: Path, demo_assets) -> None:
    """kohya's files copied into a fresh folder in training order (each PNG in pieces, as kohya writes in
    place); eval-dir --watch scores each sampling once complete, the same as eval-dir on the whole folder."""
    prompts = _prompts(tmp_path)
    source = run_demo_trainer(tmp_path / "source", demo_assets, "demo_dress", logging_dir=tmp_path / "source" / "logs",
                              **{**SAMPLING, "sample_prompts": prompts})
    settings = {"source": "kohya_samples", "prompts": str(prompts)}  # no [kohya] of this folder: [eval] prompts
    whole = cli("eval-dir", str(source), "--config", str(write_config(tmp_path / "a", demo_assets, eval_=settings)),
                cwd=tmp_path, timeout=600)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    expected = pd.read_csv(source / "loss_tracker.csv")
    _check_rows(source, expected)

    out = tmp_path / "replay"
    (out / "sample").mkdir(parents=True)
    config = write_config(tmp_path / "b", demo_assets, eval_=settings)
    proc = start_cli("eval-dir", str(out), "--config", str(config), "--watch", cwd=tmp_path)
    csv_path = out / "loss_tracker.csv"

    def wait_rows(n: int) -> None:
        end = time.monotonic() + 300
        while not csv_path.exists() or len(pd.read_csv(csv_path)) < n:
            assert time.monotonic() < end and proc.poll() is None, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.3)

    samples = sorted((source / "sample").iterdir())
    loras = {20: "demo_dress-step00000020.safetensors", 40: "demo_dress-step00000040.safetensors"}
    for n, step in enumerate((0, 10, 20, 30, 40), start=1):
        if step in loras:  # kohya: sample, then save that step's file; eval-dir names the row after it
            shutil.copy(source / loras[step], out / loras[step])
        tag = "e000000" if step == 0 else f"{step:06d}"
        for path in [p for p in samples if f"_{tag}_" in p.name]:
            data = path.read_bytes()
            with open(out / "sample" / path.name, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
                time.sleep(0.3)
                fh.write(data[len(data) // 2 :])
        wait_rows(n)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    replayed = pd.read_csv(csv_path)
    assert list(replayed["checkpoint"]) == list(expected["checkpoint"])
    for column in ("eval_score", "clip_t", "diversity", "copy_distance"):
        assert replayed[column].tolist() == expected[column].tolist(), column
