"""eval-dir: alone (a worker thread) and across processes started by torchrun / `accelerate launch`."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from lora_monitor.eval_dir import launched_processes
from lora_monitor.lock import OutputLock
from tests.conftest import write_config
from tests.test_faults import _short_training


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, 1), ({"WORLD_SIZE": "1"}, 1), ({"WORLD_SIZE": "2", "RANK": "1"}, 2), ({"WORLD_SIZE": "x"}, 1),
     ({"WORLD_SIZE": "0"}, 1)],
)
def test_launched_processes(env: dict, expected: int) -> None:
    assert launched_processes(env) == expected


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node 2 -m lora_monitor.cli ...` on the CPU (gloo), as a user would start it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "-m", "lora_monitor.cli", *args]
    return subprocess.run(argv, cwd=cwd, env=env, text=True, capture_output=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def test_two_processes_split_the_work_and_only_the_main_one_writes(tmp_path: Path, demo_assets) -> None:
    out = _short_training(tmp_path / "output", demo_assets, steps=30)
    config = write_config(tmp_path, demo_assets)
    result = _torchrun("eval-dir", str(out), "--config", str(config), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "2 processes (gloo)" in output and "process 1 of 2" in output
    counts = [int(n) for n in re.search(r"evaluated per process: 0: (\d+), 1: (\d+)", output).groups()]
    rows = pd.read_csv(out / "loss_tracker.csv")
    assert rows["status"].iloc[0] == "baseline"  # by the main process, before the rounds
    rows = rows.iloc[1:]
    files = sorted(p.name for p in out.glob("*.safetensors") if not p.stem.endswith("-best"))
    assert sorted(rows["checkpoint"]) == files  # each file exactly once, in one CSV written by one process
    assert counts[1] >= 1 and sum(counts) == len(files)  # the second process did its share
    assert set(rows["status"]) <= {"ok", "duplicate"}
    assert (out / "best.json").exists() and (out / "report.html").exists()
    assert not list(out.glob(".lora-monitor.*"))  # the lock is released, no marker files


def test_every_process_stops_when_the_main_one_cannot_start(tmp_path: Path, demo_assets) -> None:
    out = _short_training(tmp_path / "output", demo_assets, steps=10)
    config = write_config(tmp_path, demo_assets)
    with OutputLock(out):  # another monitor holds the folder
        result = _torchrun("eval-dir", str(out), "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("lora-monitor: error:") == 1 and "already" in result.stderr, result.stderr[-3000:]
    assert not (out / "loss_tracker.csv").exists()


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

    def rows() -> int:  # checkpoint rows (not the baseline)
        return int((pd.read_csv(csv_path)["status"] != "baseline").sum()) if csv_path.exists() else 0

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
    assert list(frame["checkpoint"]) == ["baseline", "demo_dress-step00000010.safetensors",
                                         "demo_dress-step00000020.safetensors"]
    assert list(frame["status"]) == ["baseline", "ok", "ok"]


def test_strengths_and_signals_turned_off(tmp_path: Path, demo_assets) -> None:
    """[eval] strengths = [0.5, 1.0] fills strengths.csv and best_strength; seeds_per_prompt = 1 and
    holdout = false leave diversity and clip_t_holdout empty (nothing generated for them)."""
    from tests.conftest import cli

    out = _short_training(tmp_path / "output", demo_assets, steps=20)
    config = write_config(tmp_path, demo_assets,
                          eval_={"strengths": [0.5, 1.0], "seeds_per_prompt": 1, "holdout": False})
    result = cli("eval-dir", str(out), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = pd.read_csv(out / "loss_tracker.csv")
    ok = rows[rows["status"] == "ok"].set_index("checkpoint")
    assert len(ok) >= 2
    assert ok["diversity"].isna().all() and ok["clip_t_holdout"].isna().all()
    assert ok["copy_distance"].notna().all() and set(ok["best_strength"]) <= {0.5, 1.0}
    strengths = pd.read_csv(out / "strengths.csv")
    assert sorted(strengths["strength"].unique()) == [0.5, 1.0]
    for name, row in ok.iterrows():
        mine = strengths[strengths["checkpoint"] == name].set_index("strength")
        assert mine.loc[1.0, "eval_score"] == pytest.approx(row["eval_score"], abs=1e-9)  # the CSV row is 1.0
        assert mine.loc[0.5, "eval_score"] != pytest.approx(row["eval_score"], abs=1e-6)  # the scale matters
    images = sorted(p.name for p in (out / "eval" / Path(ok.index[0]).stem).glob("*.png"))
    assert len(images) == len(sorted((out / "eval" / "baseline").glob("*.png"))) == 4  # one per prompt
