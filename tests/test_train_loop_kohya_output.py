"""What `train` shows of kohya's output and keeps of it: warnings, the exit report, kohya.log, its threads."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest

from lora_monitor.config import parse_config
from lora_monitor.cpu_share import CpuShare
from lora_monitor.kohya.output_parser import KohyaOutputParser
from lora_monitor.run_spec import train_spec
from lora_monitor.run_state import SignalCatcher
from lora_monitor.tracking.live import LiveView
from lora_monitor.train_loop import TrainRun, exit_report
from tests.conftest import cli, start_cli, write_config

VENV_HINT = ("hint: kohya ran on lora-monitor's Python, which has no 'cv2' (one of kohya's packages); set [kohya] "
             "python to kohya's own venv, e.g. python = \"/path/to/sd-scripts/venv/bin/python\"")
CV2_TRACEBACK = (
    "Traceback (most recent call last):",
    '  File "/home/me/sd-scripts/train_network.py", line 18, in <module>',
    "    from library import deepspeed_utils, model_util, strategy_base, strategy_sd",
    '  File "/home/me/sd-scripts/library/model_util.py", line 8, in <module>',
    "    import cv2",
    "ModuleNotFoundError: No module named 'cv2'",
)


@pytest.mark.parametrize(("last_lines", "python", "hint"), [
    (CV2_TRACEBACK, None, VENV_HINT),
    (CV2_TRACEBACK[:-1] + ("ModuleNotFoundError: No module named 'library.train_util'",), None,
     VENV_HINT.replace("'cv2'", "'library.train_util'")),
    (CV2_TRACEBACK, "/opt/kohya/venv/bin/python",
     "hint: [kohya] python = /opt/kohya/venv/bin/python has no 'cv2'; install kohya's requirements there "
     "(pip install -r requirements.txt in sd-scripts) or point it at kohya's venv"),
    (CV2_TRACEBACK[:-1] + ("ValueError: boom",), None, None),
    (("ImportError: cannot import name 'x' from 'y'",), None, None),
    ((), None, None),
])
def test_exit_report(last_lines: tuple[str, ...], python: str | None, hint: str | None) -> None:
    report = exit_report(1, last_lines, python)
    assert report[0] == "kohya exited with code 1; its last lines:"
    assert report[1:1 + len(last_lines)] == [f"  | {line}" for line in last_lines]
    assert report[1 + len(last_lines):] == ([hint] if hint else [])


def _train_run(tmp_path: Path, share: CpuShare | None = None) -> tuple[TrainRun, io.StringIO]:
    (tmp_path / "sd-scripts").mkdir(parents=True)
    config = parse_config('[kohya]\nsd_scripts = "sd-scripts"\n[kohya.args]\noutput_dir = "out"\n',
                          tmp_path / "c.toml")
    shown = io.StringIO()
    return TrainRun(train_spec(config), LiveView(shown, live=False), SignalCatcher(), share), shown


def test_kohyas_warnings_reach_the_view_once_each(tmp_path: Path) -> None:
    run, shown = _train_run(tmp_path)
    parser = KohyaOutputParser()
    stderr = (  # lines of the captured run (tests/fixtures/kohya/run-python-u/stderr.log)
        "2026-11-26 21:15:01 INFO     Using DreamBooth method.       train_network.py:530\n"
        "                    WARNING  no regularization images /       train_util.py:2167\n"
        "                             正則化画像が見つかりませんでした                    \n"
        "\rsteps:  67%|██████▋   | 4/6 [02:30<01:15, 37.69s/it, avr_loss=1.14]2026-11-26 21:18:23 WARNING  "
        "Failed to get git commit      sai_model_spec.py:288\n"
        "                             hash, using fallback                               \n"
        "\rsteps: 100%|██████████| 6/6 [02:58<00:00, 29.69s/it, avr_loss=1.22]                    WARNING  "
        "Failed to get git commit      sai_model_spec.py:288\n"
        "                             hash, using fallback                               \n"
    )
    for event in parser.feed(stderr, "stderr") + parser.flush():
        run.handle(event)
    messages = [line for line in shown.getvalue().splitlines() if "kohya:" in line]
    assert messages == [
        "[lora-monitor] kohya: warning: no regularization images / 正則化画像が見つかりませんでした",
        "[lora-monitor] kohya: warning: Failed to get git commit hash, using fallback",
    ]


def test_kohya_gets_its_share_of_threads(tmp_path: Path) -> None:
    run, _ = _train_run(tmp_path, CpuShare(kohya_threads=3, eval_threads=1, eval_nice=10))
    assert run.proc.env == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}
    other, _ = _train_run(tmp_path / "gpu", CpuShare(eval_nice=10))
    assert other.proc.env == {}


# -- the real loop: kohya.log of a `lora-monitor train` of the demo trainer ---------------------------------------

NO_EVAL = {"enabled": False}


def test_train_keeps_kohyas_output_in_kohya_log_and_shows_its_warnings(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets, kohya={"max_train_steps": 4, "save_every_n_steps": 2},
                          eval_=NO_EVAL)
    result = cli("train", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "kohya: warning: no regularization images" in result.stdout  # the demo trainer's kohya-style WARNING
    log = (tmp_path / "output" / "kohya.log").read_bytes()
    first = log.split(b"\n", 1)[0].decode()
    assert first.startswith("==== ") and "lora-monitor started kohya in" in first and "train_network.py" in first
    assert b"WARNING  no regularization images" in log  # rich's record as kohya printed it
    assert b"\rsteps:" in log and b"saving checkpoint:" in log and b"model saved." in log
    assert log.rstrip().endswith(b"kohya exited with code 0")


def test_kohya_log_survives_kill_9_of_the_monitor(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets, kohya={"max_train_steps": 400}, eval_=NO_EVAL)
    log_path = tmp_path / "output" / "kohya.log"
    proc = start_cli("train", "--config", str(config), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not (log_path.exists() and b"saving checkpoint:" in log_path.read_bytes()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = log_path.read_bytes()
    assert log.startswith(b"==== ") and b"saving checkpoint:" in log and b"\rsteps:" in log
