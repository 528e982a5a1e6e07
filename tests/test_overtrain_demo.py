"""`lora-monitor demo --scenario overtrain` for real: one training image trained far past its useful point.

One real run (trainer subprocess, live evaluation, decisions): its CSV must show the over-training signals
moving the way memorisation moves them, the best checkpoint must be one before the flags, and the run must
stop itself naming over-training.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from scipy.stats import spearmanr

from tests.conftest import cli


@pytest.fixture(scope="module")
def overtrain_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("overtrain") / "run"
    started = time.monotonic()
    result = cli("demo", "--scenario", "overtrain", "--workdir", str(workdir), cwd=workdir.parent, timeout=600)
    print(f"overtrain demo took {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]  # 0 after an early stop
    return workdir, result


def _ok_rows(workdir: Path) -> pd.DataFrame:
    df = pd.read_csv(workdir / "output" / "loss_tracker.csv")
    return df[df["status"] == "ok"].sort_values("step")


def test_diversity_and_copy_distance_fall_with_step(overtrain_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    workdir, _ = overtrain_run
    ok = _ok_rows(workdir)
    assert len(ok) >= 4, ok.to_string()
    shown = ok[["step", "diversity", "copy_distance", "copies"]].to_string()
    assert spearmanr(ok["step"], ok["diversity"]).statistic <= -0.8, shown
    assert spearmanr(ok["step"], ok["copy_distance"]).statistic <= -0.8, shown
    # the LoRA really copies its one image by the end (Carlini's threshold, not tuned for this demo) ...
    assert ok["copies"].iloc[-1] > 0, shown
    # ... and did not at first
    assert ok["copies"].iloc[0] == 0, shown


def test_best_is_an_earlier_checkpoint_than_the_last(overtrain_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    workdir, _ = overtrain_run
    out = workdir / "output"
    best = json.loads((out / "best.json").read_text())
    ok = _ok_rows(workdir)
    saved = sorted(out.glob("demo_overtrain-step*.safetensors"))
    assert best["checkpoint"] is not None, best
    assert best["checkpoint"] != saved[-1].name and best["step"] < ok["step"].max(), best
    assert best["excluded"] and all(e["reasons"] for e in best["excluded"]), best
    assert all(e["step"] > best["step"] for e in best["excluded"]), best
    # the lowest eval_score of all is a flagged one: the old rule would have crowned an over-trained file
    assert ok["eval_score"].idxmin() != ok.index[ok["checkpoint"] == best["checkpoint"]][0]


def test_stops_early_naming_overtraining(overtrain_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    workdir, result = overtrain_run
    assert "overtraining = true" in (workdir / "config.toml").read_text()
    stop = json.loads((workdir / "output" / "early_stop.json").read_text())
    assert stop["overtraining"] is True
    assert "over-trained" in stop["reason"]
    flagged = [f for f in stop["flags"] if f["reasons"]]
    assert len(flagged) >= stop["patience"] and stop["step"] == flagged[-1]["step"]
    assert any(r.startswith(("copies", "diversity")) for f in flagged for r in f["reasons"])
    assert stop["step"] < 400  # kohya was asked for 400 steps and stopped well before
    assert "early stop" in result.stdout
