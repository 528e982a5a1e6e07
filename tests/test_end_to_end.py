"""The whole loop for real: `lora-monitor demo` (real kohya-style trainer subprocess, real watcher, real
diffusers pipeline on the tiny model, real metrics), then `eval-dir` reproducing its rows from the files."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

CONTRACT = "step,epoch,total_loss,visual_loss,fashion_clip_loss,color_loss,learning_rate,timestamp,checkpoint"
METRICS = ["visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score"]
SIGNALS = ["clip_t_holdout", "diversity", "copy_distance", "copies"]  # val_loss: the demo runs no validation


def _cli(*args: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lora_monitor.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, float]:
    workdir = tmp_path_factory.mktemp("demo") / "demo run ü"  # spaces and non-ASCII must work
    started = time.monotonic()
    result = _cli("demo", "--workdir", str(workdir), cwd=workdir.parent, timeout=600)
    elapsed = time.monotonic() - started
    print(f"demo took {elapsed:.1f} s", file=sys.stderr)
    return workdir, result, elapsed


def test_demo_runs_the_whole_loop(demo_run: tuple[Path, subprocess.CompletedProcess, float]) -> None:
    workdir, result, _ = demo_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "\x1b[" not in result.stdout  # piped: plain lines, no control codes
    assert (workdir / "config.toml").exists()
    out = workdir / "output"
    csv_path = out / "loss_tracker.csv"
    assert csv_path.read_text().startswith(CONTRACT + ",")
    df = pd.read_csv(csv_path)
    ok = df[df["status"] == "ok"]
    assert len(ok) >= 4
    for column in METRICS:
        assert ok[column].map(math.isfinite).all(), column
    # the trainer's own values, read from its output and logs
    assert ok["total_loss"].notna().all()
    assert ok["epoch"].notna().all()
    assert ok["learning_rate"].notna().all()
    assert pd.to_datetime(df["timestamp"], format="ISO8601").notna().all()
    for stem in ok["checkpoint"].str.replace(".safetensors", "", regex=False):
        assert sorted(p.name for p in (out / "eval" / stem).glob("*.png")), stem
    assert (out / "best.json").exists()
    assert (out / "report.html").exists()
    # the base model's row comes first, then every checkpoint carries the over-training signals
    baseline = df.iloc[0]
    assert (baseline["status"], baseline["step"], baseline["checkpoint"]) == ("baseline", 0, "baseline")
    for column in [*METRICS, *SIGNALS]:
        assert math.isfinite(baseline[column]), column
        assert ok[column].map(math.isfinite).all(), column
    assert (ok["copies"] == ok["copies"].round()).all() and (ok["copies"] >= 0).all()
    shown = sorted(p.name for p in (out / "eval" / "baseline").glob("*.png"))
    first = Path(ok["checkpoint"].iloc[0]).stem
    per_checkpoint = sorted(p.name for p in (out / "eval" / first).glob("*.png"))
    assert shown == per_checkpoint and len(shown) > 4  # two seeds per prompt and the held-out prompts
    # lora-monitor's own TensorBoard run sits beside kohya's, so one --logdir shows both
    assert list((out / "logs" / "lora-monitor").glob("events.out.tfevents.*"))
    assert list((out / "logs").glob("*/network_train/events.out.tfevents.*"))


def test_color_loss_falls_with_training(demo_run: tuple[Path, subprocess.CompletedProcess, float]) -> None:
    """Validity on a controlled task: the references are red dresses the tiny base never draws."""
    from scipy.stats import spearmanr

    workdir, _, _ = demo_run
    df = pd.read_csv(workdir / "output" / "loss_tracker.csv")
    ok = df[df["status"] == "ok"].sort_values("step")
    assert len(ok) >= 5
    rho = spearmanr(ok["step"], ok["color_loss"]).statistic
    assert rho <= -0.8, ok[["step", "color_loss"]].to_string()


def test_eval_dir_reproduces_live_rows(demo_run: tuple[Path, subprocess.CompletedProcess, float]) -> None:
    workdir, _, _ = demo_run
    out = workdir / "output"
    new_csv = workdir / "new.csv"
    result = _cli("eval-dir", str(out), "--config", str(workdir / "config.toml"), "--csv", str(new_csv),
                  cwd=workdir, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    live = pd.read_csv(out / "loss_tracker.csv").set_index("checkpoint")
    again = pd.read_csv(new_csv).set_index("checkpoint")
    live = live[live["status"] == "ok"]
    assert set(live.index) <= set(again.index)
    for name in live.index:
        for column in [*METRICS, *SIGNALS]:
            assert abs(live.loc[name, column] - again.loc[name, column]) <= 1e-4, (name, column)
    assert again.loc["baseline", "status"] == "baseline"  # written by eval-dir too, as the new CSV had none
    # running it again evaluates nothing new: every checkpoint is already in the CSV
    rows_before = len(again)
    result = _cli("eval-dir", str(out), "--config", str(workdir / "config.toml"), "--csv", str(new_csv),
                  cwd=workdir, timeout=300)
    assert result.returncode == 0
    assert len(pd.read_csv(new_csv)) == rows_before
