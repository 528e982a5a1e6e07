"""Faults survived on the real loop (tiny model, real trainer subprocess): nothing lost, no stray process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import cli, run_demo_trainer, start_cli, write_config

TRAINER = Path(__file__).resolve().parent.parent / "lora_monitor" / "demo" / "sd_scripts" / "train_network.py"


def _rows(csv_path: Path) -> pd.DataFrame:
    """The checkpoints' rows (the base model's baseline row left out)."""
    if not csv_path.exists():
        return pd.DataFrame(columns=["checkpoint", "status"])
    frame = pd.read_csv(csv_path)
    return frame[frame["checkpoint"] != "baseline"]


def _wait_for(cond, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"monitor exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def _trainers_of(workdir: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "train_network.py" in cmd and str(workdir) in cmd:
            out.append(p)
    return out


def test_kill9_then_eval_dir_fills_exactly_the_gaps(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets, kohya={"max_train_steps": 60})
    out = tmp_path / "output"
    csv_path = out / "loss_tracker.csv"
    proc = start_cli("train", "--config", str(config), cwd=tmp_path)
    _wait_for(lambda: len(_rows(csv_path)) >= 1, 240, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _wait_for(lambda: not _trainers_of(tmp_path), 30)  # kohya does not outlive its monitor
    before = csv_path.read_text()
    assert before.endswith("\n")  # every row written is whole
    result = cli("eval-dir", str(out), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    after = csv_path.read_text()
    assert after.startswith(before)  # rows already written are untouched
    rows = _rows(csv_path)
    on_disk = sorted(p.name for p in out.glob("*.safetensors") if not p.stem.endswith("-best"))
    assert sorted(rows["checkpoint"]) == on_disk  # no duplicates, no gaps


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_on_train_stops_kohya_and_keeps_the_csv(tmp_path: Path, demo_assets, signum: int, code: int) -> None:
    config = write_config(tmp_path, demo_assets, kohya={"max_train_steps": 400})
    proc = start_cli("train", "--config", str(config), cwd=tmp_path)
    lines: list[str] = []
    while True:
        line = proc.stdout.readline()
        assert line, "monitor ended before kohya started: " + "".join(lines)
        lines.append(line)
        if m := re.search(r"kohya started \(pid (\d+)\)", line):
            kohya_pid = int(m.group(1))
            break
    csv_path = tmp_path / "output" / "loss_tracker.csv"
    _wait_for(lambda: (tmp_path / "output" / "demo_dress-step00000010.safetensors").exists(), 240, proc)
    started = time.monotonic()
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, "".join(lines) + output
    assert time.monotonic() - started < 60  # the grace period (10 s in the demo config) plus the queued evals
    with pytest.raises(ProcessLookupError):
        os.killpg(kohya_pid, 0)  # nothing of kohya's process group remains
    rows = _rows(csv_path)
    assert csv_path.read_text().endswith("\n")
    assert set(rows["status"]) <= {"ok", "duplicate", "failed", "skipped"}


def test_kohya_crash_reports_and_evaluates_what_was_saved(tmp_path: Path, demo_assets) -> None:
    scripts = tmp_path / "crashing sd-scripts"
    scripts.mkdir()
    (scripts / "train_network.py").write_text(
        "import runpy, sys\n"
        f"sys.argv[0] = {str(TRAINER)!r}\n"
        f"runpy.run_path({str(TRAINER)!r}, run_name='__main__')\n"
        "raise RuntimeError('simulated failure after the last save')\n",
        encoding="utf-8",
    )
    config = write_config(tmp_path, demo_assets, kohya={"max_train_steps": 20})
    text = config.read_text().replace(f'sd_scripts = "{TRAINER.parent}"', f'sd_scripts = "{scripts}"')
    config.write_text(text)
    result = cli("train", "--config", str(config), cwd=tmp_path, timeout=400)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "kohya exited with code 1" in result.stdout
    assert "RuntimeError: simulated failure" in result.stdout
    rows = _rows(tmp_path / "output" / "loss_tracker.csv")
    assert {"demo_dress-step00000010.safetensors", "demo_dress-step00000020.safetensors"} <= set(rows["checkpoint"])
    assert (rows["status"] == "ok").sum() >= 2


def _short_training(folder: Path, demo_assets, steps: int = 10) -> Path:
    """Run the demo trainer alone for `steps` steps (a file every 10); return its folder of LoRA files."""
    return run_demo_trainer(folder, demo_assets, "demo_dress", max_train_steps=steps, save_every_n_steps=10)


def test_broken_checkpoints_get_a_row_each_and_the_next_goes_on(tmp_path: Path, demo_assets) -> None:
    out = _short_training(tmp_path / "output", demo_assets)
    good = out / "demo_dress-step00000010.safetensors"
    data = good.read_bytes()
    (out / "demo_dress-step00000020.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    (out / "demo_dress-step00000030.safetensors").write_bytes(os.urandom(4096))  # corrupt
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4)},
              str(out / "demo_dress-step00000040.safetensors"), metadata={"ss_steps": "40"})  # not a LoRA
    state = load_file(str(good))
    bad_shape = {k: (torch.zeros(v.shape[0], v.shape[1] + 3, *v.shape[2:]) if k.endswith("lora_down.weight")
                     and v.ndim >= 2 else v) for k, v in state.items()}
    save_file(bad_shape, str(out / "demo_dress-step00000050.safetensors"), metadata={"ss_steps": "50"})
    (out / "old.ckpt").write_bytes(b"pickle, never loaded")
    (out / "demo_dress.safetensors").unlink()
    config = write_config(tmp_path, demo_assets)
    result = cli("eval-dir", str(out), "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _rows(out / "loss_tracker.csv").set_index("checkpoint")
    assert rows.loc[good.name, "status"] == "ok"
    expected = {
        "demo_dress-step00000020.safetensors": "truncated",
        "demo_dress-step00000030.safetensors": "not a complete safetensors file",
        "demo_dress-step00000040.safetensors": "not a LoRA",
        "demo_dress-step00000050.safetensors": "does not fit the base model",
    }
    for name, reason in expected.items():
        assert rows.loc[name, "status"] == "failed", name
        assert reason in rows.loc[name, "note"], (name, rows.loc[name, "note"])
    assert "old.ckpt" in result.stdout and "never pickle" in result.stdout


def test_second_monitor_on_the_same_folder_is_refused(tmp_path: Path, demo_assets) -> None:
    out = _short_training(tmp_path / "output", demo_assets)
    config = write_config(tmp_path, demo_assets)
    first = start_cli("eval-dir", str(out), "--config", str(config), "--watch", cwd=tmp_path)
    try:
        _wait_for(lambda: (out / ".lora-monitor.lock").exists(), 120, first)
        second = cli("eval-dir", str(out), "--config", str(config), cwd=tmp_path)
        assert second.returncode == 2
        assert f"another lora-monitor (pid {first.pid})" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 0
    assert not (out / ".lora-monitor.lock").exists()


def test_early_stop_stops_kohya_and_exits_0(tmp_path: Path, demo_assets) -> None:
    """An early stop during train: kohya is stopped cleanly, queued evaluations finish, the reason is recorded."""
    # Asking colour loss to *rise* makes the rule fire at the second evaluation, since training lowers it.
    config = write_config(tmp_path, demo_assets, kohya={"max_train_steps": 400})
    text = config.read_text().replace('monitor = "eval_score"\npatience = 3',
                                      'monitor = "color_loss"\nmode = "max"\npatience = 1')
    text = text.replace("[early_stopping]\nenabled = false", "[early_stopping]\nenabled = true")
    config.write_text(text)
    result = cli("train", "--config", str(config), cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "early stop at step" in result.stdout
    out = tmp_path / "output"
    saved = sorted(out.glob("demo_dress-step*.safetensors"))
    assert 2 <= len(saved) < 40  # stopped long before step 400
    assert not (out / "demo_dress.safetensors").exists()  # kohya does not save on interrupt
    assert not _trainers_of(tmp_path)
    assert "early stop" in (out / "report.html").read_text()
    record = json.loads((out / "early_stop.json").read_text())
    assert record["monitor"] == "color_loss" and record["mode"] == "max" and len(record["history"]) >= 2
    assert record["reason"].startswith("early stop at step")


# --------------------------------------------- faults injected into the real loop (tests/fault_hook)
FAULT_HOOK = Path(__file__).resolve().parent / "fault_hook"


def _cli_with_fault(fault: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`lora-monitor` as a real process with `fault` raised where it really comes from (fault_hook's doc)."""
    import sys

    path = os.pathsep.join(p for p in (str(FAULT_HOOK), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path,
           "LORA_MONITOR_TEST_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "lora_monitor.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=400, stdin=subprocess.DEVNULL)


def _saved(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("*.safetensors") if not p.stem.endswith("-best"))


@pytest.mark.parametrize(
    ("fault", "status", "note"),
    [
        ("oom-over:1", "ok", ""),  # batches of 2 do not fit: halved to 1 for the rest of the run
        ("oom-over:0", "failed", "out of memory even with batch size 1 (no offload on cpu)"),
    ],
)
def test_out_of_memory_in_the_real_loop(tmp_path: Path, demo_assets, fault: str, status: str, note: str) -> None:
    config = write_config(tmp_path, demo_assets, kohya={"max_train_steps": 20}, eval_={"batch_size": 2})
    result = _cli_with_fault(fault, "train", "--config", str(config), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]  # training is unaffected: kohya's own exit code
    out = tmp_path / "output"
    rows = _rows(out / "loss_tracker.csv")
    assert sorted(rows["checkpoint"]) == _saved(out) and len(rows) >= 2
    assert set(rows["status"]) <= {status, "duplicate"} and status in set(rows["status"])
    if note:
        failed = rows[rows["status"] == "failed"]
        assert all(note in n for n in failed["note"]), failed["note"].tolist()
    else:
        assert "retrying with batch size 1" in output


def test_disk_full_on_a_row_in_the_real_loop(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets, kohya={"max_train_steps": 30})
    result = _cli_with_fault("enospc-row:2", "train", "--config", str(config), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]  # the row is lost, not the run
    out = tmp_path / "output"
    csv_path = out / "loss_tracker.csv"
    assert csv_path.read_text().endswith("\n")  # no half row
    missing = sorted(set(_saved(out)) - set(_rows(csv_path)["checkpoint"]))
    assert len(missing) == 1
    assert re.search(rf"{re.escape(missing[0])}: row not written - .*No space left on device", output), output
    filled = cli("eval-dir", str(out), "--config", str(config), cwd=tmp_path)
    assert filled.returncode == 0, filled.stdout[-2000:] + filled.stderr[-2000:]
    assert sorted(_rows(csv_path)["checkpoint"]) == _saved(out)  # eval-dir adds exactly the lost row
