"""The CSV: contract header, fsynced whole rows, continuation, refusal of foreign CSVs, no half rows."""

import errno
import os
from pathlib import Path

import pandas as pd
import pytest

from lora_monitor.columns import COLUMNS
from lora_monitor.errors import UserError
from lora_monitor.tracking import tracker as tracker_mod
from lora_monitor.tracking.tracker import Tracker

CONTRACT = "step,epoch,total_loss,visual_loss,fashion_clip_loss,color_loss,learning_rate,timestamp,checkpoint"


def test_header_and_rows_read_by_pandas(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    t = Tracker(path)
    t.append({"step": 20, "epoch": 1, "total_loss": 0.123, "visual_loss": 0.5, "checkpoint": "a, b.safetensors",
              "timestamp": "2026-01-01T00:00:00+00:00", "status": "ok"})
    t.append({"step": 40, "checkpoint": "c.safetensors", "status": "failed", "note": 'says "no"\nnewline'})
    text = path.read_text()
    assert text.startswith(CONTRACT + ",")
    df = pd.read_csv(path)
    assert list(df.columns) == list(COLUMNS)
    assert df["step"].tolist() == [20, 40]
    assert df["checkpoint"][0] == "a, b.safetensors"
    assert pd.isna(df["total_loss"][1])  # never invented


def test_continue_existing_and_done(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    Tracker(path).append({"step": 1, "checkpoint": "x.safetensors", "status": "ok"})
    Tracker(path).append({"step": 2, "checkpoint": "y.safetensors", "status": "failed"})
    t = Tracker(path)
    assert t.done() == {"x.safetensors"}
    assert len(t.rows) == 2
    assert path.read_text().count(CONTRACT) == 1


def test_foreign_csv_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="different header"):
        Tracker(path)
    assert path.read_text() == "a,b\n1,2\n"


def test_torn_last_row_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    Tracker(path).append({"step": 1, "checkpoint": "x.safetensors", "status": "ok"})
    with open(path, "a") as fh:
        fh.write("2,1,0.5")  # a crash mid-row
    t = Tracker(path)
    assert len(t.rows) == 1
    assert path.read_text().endswith("\n")


def test_disk_full_leaves_no_half_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.csv"
    t = Tracker(path)
    before = path.read_bytes()
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tracker_mod.os, "write", half_write)
    with pytest.raises(UserError, match="No space left"):
        t.append({"step": 1, "checkpoint": "x.safetensors", "status": "ok"})
    monkeypatch.undo()
    assert path.read_bytes() == before


def test_csv_path_is_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="is a folder"):
        Tracker(tmp_path)


def test_an_older_csv_gets_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    from lora_monitor.columns import PREVIOUS_COLUMNS

    path = tmp_path / "loss_tracker.csv"
    old_row = ["10", "1", "0.1", "0.2", "0.3", "4.0", "0.0001", "2026-01-01T00:00:00+00:00", "a.safetensors",
               "0.25", "0.9", "ok", "", "1.5"]
    path.write_text(",".join(PREVIOUS_COLUMNS) + "\n" + ",".join(old_row) + "\n" + "20,1,0.1", encoding="utf-8")
    tracker = Tracker(path)
    assert [r["checkpoint"] for r in tracker.rows] == ["a.safetensors"]  # the torn last row dropped
    assert tracker.rows[0]["eval_score"] == "0.9" and tracker.rows[0]["diversity"] == ""
    tracker.append({"step": 20, "checkpoint": "b.safetensors", "status": "ok", "diversity": 0.5})
    frame = pd.read_csv(path)
    assert list(frame.columns) == list(COLUMNS)
    assert list(frame["checkpoint"]) == ["a.safetensors", "b.safetensors"]
    assert frame["diversity"].isna().tolist() == [True, False]
    assert not list(tmp_path.glob(".*.tmp"))
