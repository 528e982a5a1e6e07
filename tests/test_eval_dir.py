"""eval-dir split across processes (as under `accelerate launch --num_processes 2`): one CSV, no duplicates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lora_monitor.eval_dir import Slot, process_slot
from tests.conftest import write_config
from tests.test_faults import _short_training


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, Slot(0, 1)),
        ({"RANK": "1", "WORLD_SIZE": "2"}, Slot(1, 2)),
        ({"RANK": "0", "WORLD_SIZE": "4"}, Slot(0, 4)),
        ({"RANK": "4", "WORLD_SIZE": "4"}, Slot(0, 1)),  # inconsistent: run alone rather than skip files
        ({"RANK": "x", "WORLD_SIZE": "2"}, Slot(0, 1)),
    ],
)
def test_process_slot(env: dict, expected: Slot) -> None:
    assert process_slot(env) == expected


@pytest.mark.parametrize(("slot", "mine"), [(Slot(0, 1), [0, 1, 2, 3]), (Slot(0, 2), [0, 2]), (Slot(1, 2), [1, 3])])
def test_files_are_split_round_robin(slot: Slot, mine: list[int]) -> None:
    assert [i for i in range(4) if slot.mine(i)] == mine


def test_two_processes_share_one_csv_without_duplicates(tmp_path: Path, demo_assets) -> None:
    out = _short_training(tmp_path / "output", demo_assets, steps=30)
    config = write_config(tmp_path, demo_assets)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "lora_monitor.cli", "eval-dir", str(out), "--config",
                                       str(config)], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "process 1 of 2" in outputs[1] and "2 to evaluate here" in outputs[1]
    rows = pd.read_csv(out / "loss_tracker.csv")
    files = sorted(p.name for p in out.glob("*.safetensors") if not p.stem.endswith("-best"))
    assert sorted(rows["checkpoint"]) == files  # each file exactly once
    assert set(rows["status"]) <= {"ok", "duplicate"}
    assert (out / "best.json").exists() and (out / "report.html").exists()
    assert not list(out.glob(".lora-monitor.*"))  # lock and peer markers cleaned up


def test_watch_evaluates_new_files_until_ctrl_c(tmp_path: Path, demo_assets) -> None:
    import signal
    import time

    from tests.conftest import start_cli

    out = _short_training(tmp_path / "output", demo_assets, steps=20)
    later = tmp_path / "later.safetensors"
    (out / "demo_dress-step00000020.safetensors").rename(later)
    (out / "demo_dress.safetensors").unlink()
    config = write_config(tmp_path, demo_assets)
    proc = start_cli("eval-dir", str(out), "--config", str(config), "--watch", cwd=tmp_path)
    csv_path = out / "loss_tracker.csv"

    def rows() -> int:
        return len(pd.read_csv(csv_path)) if csv_path.exists() else 0

    def wait(n: int) -> None:
        end = time.monotonic() + 240
        while rows() < n:
            assert time.monotonic() < end and proc.poll() is None, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.3)

    wait(1)
    data = later.read_bytes()
    with open(out / "demo_dress-step00000020.safetensors", "wb") as fh:  # written in place, in pieces
        for i in range(0, len(data), len(data) // 4 + 1):
            fh.write(data[i : i + len(data) // 4 + 1])
            fh.flush()
            time.sleep(0.2)
    wait(2)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    frame = pd.read_csv(csv_path)
    assert list(frame["checkpoint"]) == ["demo_dress-step00000010.safetensors", "demo_dress-step00000020.safetensors"]
    assert list(frame["status"]) == ["ok", "ok"]
