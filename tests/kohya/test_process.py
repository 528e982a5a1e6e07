"""kohya/process.py and kohya/console_log.py: real subprocesses standing in for train_network.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from lora_monitor.config import KohyaConfig
from lora_monitor.errors import UserError
from lora_monitor.events import CheckpointSaving, TrainerExited, TrainerLog, TrainProgress
from lora_monitor.kohya import console_log as kohya_console_log
from lora_monitor.kohya import process as kohya_process
from lora_monitor.kohya.args import build_argv
from lora_monitor.kohya.process import KohyaProcess, exit_code
from tests.kohya.test_output_parser import EXPECTED, PROGRESS
from tests.kohya_replay import FIXTURE_OUT, SAVES, replay_plan

REPLAY_SECONDS = 3.0  # the captured 238 s run, squeezed
SAVE_SECONDS = 0.6  # each LoRA file is written over this long, in SAVE_PIECES writes
SAVE_PIECES = 5

# Replays a captured run: chunks at their (squeezed) times, LoRA files written in place, slowly.
REPLAY_SCRIPT = r'''
import json, sys, time
from pathlib import Path


def option(name):
    return sys.argv[sys.argv.index("--" + name) + 1]


def lora_bytes(steps, epoch):
    meta = {"ss_steps": str(steps), "ss_epoch": str(epoch), "ss_output_name": "testlora"}
    header, offset = {"__metadata__": meta}, 0
    shapes = {"lora_unet_a.lora_down.weight": [4, 4096], "lora_unet_a.lora_up.weight": [4096, 4],
              "lora_unet_a.alpha": []}
    for name, shape in shapes.items():
        size = 4 * (shape[0] * shape[1] if shape else 1)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + bytes(offset)


def save(path, steps, epoch, seconds, pieces):
    data = lora_bytes(steps, epoch)
    with open(path, "wb") as f:  # in place, like kohya: no temporary name
        for i in range(pieces):
            f.write(data[i * len(data) // pieces:(i + 1) * len(data) // pieces])
            f.flush()
            time.sleep(seconds / pieces)


out_dir = Path(option("output_dir"))
plan = json.loads(Path(option("replay_plan")).read_text(encoding="utf-8"))
start, lag = time.monotonic(), 0.0
for action in plan["actions"]:
    pause = start + action["t"] + lag - time.monotonic()
    if pause > 0:
        time.sleep(pause)
    if "save" in action:
        began = time.monotonic()
        time.sleep(0.1)
        save(out_dir / action["save"], action["ss_steps"], action["ss_epoch"], plan["save_s"], plan["pieces"])
        lag += time.monotonic() - began
        continue
    data = action["data"].replace(plan["fixture_out"], str(out_dir)).encode("utf-8")
    stream = sys.stdout.buffer if action["stream"] == "stdout" else sys.stderr.buffer
    for i in range(0, len(data), 7):  # odd-sized writes: UTF-8 characters split across reads
        stream.write(data[i:i + 7])
        stream.flush()
'''

# Writes what it was given and how it runs to $ECHO_TO, then prints it.
ECHO_SCRIPT = r'''
import json, os, signal, sys
report = {
    "argv": sys.argv[1:],
    "unbuffered": os.environ.get("PYTHONUNBUFFERED"),
    "columns": os.environ.get("COLUMNS"),
    "extra": os.environ.get("EXTRA_VAR"),
    "own_group": os.getpgid(0) == os.getpid(),
    "sigint_default": signal.getsignal(signal.SIGINT) is signal.default_int_handler,
    "cwd": os.getcwd(),
}
with open(os.environ["ECHO_TO"], "w", encoding="utf-8") as f:
    json.dump(report, f, ensure_ascii=False)
print(json.dumps(report, ensure_ascii=False))
'''

# Ignores SIGINT and SIGTERM, and so does a grandchild in the same process group.
STUBBORN_SCRIPT = r'''
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
code = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('grandchild up', flush=True); time.sleep(60)")
subprocess.Popen([sys.executable, "-c", code])
print("ready", flush=True)
time.sleep(60)
'''

# Behaves like kohya on SIGINT: KeyboardInterrupt, traceback, exit.
INTERRUPTIBLE_SCRIPT = r'''
import time
print("ready", flush=True)
time.sleep(60)
'''

# All on stderr: the order of lines across the two pipes is not knowable.
FAILING_SCRIPT = r'''
import sys
for i in range(25):
    print(f"line {i}", file=sys.stderr)
raise ValueError("boom")
'''


class Recorder:
    """on_event target: keeps every event, with the output folder's file sizes when a save is announced."""

    def __init__(self, out_dir: Path | None = None) -> None:
        self.events: list[object] = []
        self.sizes_at_announce: dict[str, int] = {}
        self.out_dir = out_dir
        self.lock = threading.Lock()

    def __call__(self, event: object) -> None:
        if isinstance(event, CheckpointSaving):
            path = event.path
            self.sizes_at_announce[path.name] = path.stat().st_size if path.exists() else -1
        with self.lock:
            self.events.append(event)

    def logs(self) -> list[str]:
        with self.lock:
            return [e.text for e in self.events if isinstance(e, TrainerLog)]

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.logs():
            assert time.monotonic() < deadline, f"no {text!r} in {self.logs()}"
            time.sleep(0.05)


def sd_scripts_with(tmp_path: Path, script: str, name: str = "train_network.py") -> Path:
    folder = tmp_path / "sd-scripts"
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(script, encoding="utf-8")
    return folder


def run_to_end(kohya: KohyaConfig, recorder: Recorder, env: dict[str, str] | None = None) -> KohyaProcess:
    proc = KohyaProcess(build_argv(kohya), cwd=kohya.sd_scripts, on_event=recorder, env=env)
    proc.start()
    assert proc.wait(timeout=60) is not None, "the stand-in did not finish"
    return proc


def group_is_gone(pgid: int, timeout: float = 10.0) -> bool:
    """Killed processes linger as zombies until init reaps them, so poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# -- a replayed kohya run -----------------------------------------------------------------------------------


def test_replayed_run_gives_the_captured_steps_losses_epochs_and_saves(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    plan = {"actions": replay_plan("run-python-u", REPLAY_SECONDS),
            "fixture_out": FIXTURE_OUT["run-python-u"], "save_s": SAVE_SECONDS, "pieces": SAVE_PIECES}
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan), encoding="utf-8")
    kohya = KohyaConfig(sd_scripts=sd_scripts_with(tmp_path, REPLAY_SCRIPT),
                        args={"output_dir": str(out_dir), "replay_plan": str(plan_path)})
    recorder = Recorder(out_dir)
    started = time.monotonic()
    proc = run_to_end(kohya, recorder)
    elapsed = time.monotonic() - started

    events = recorder.events
    assert isinstance(events[-1], TrainerExited) and events[-1].returncode == 0 and proc.returncode == 0
    progress = [(e.step, e.loss) for e in events if isinstance(e, TrainProgress)]
    assert progress == [(step, loss) for step, loss, _ in PROGRESS["run-python-u"]]
    want = EXPECTED["run-python-u"]
    assert proc.parser.loss_at_step == want["loss_at_step"]
    assert proc.parser.epoch_at_step == want["epoch_at_step"]
    saves = [e.path for e in events if isinstance(e, CheckpointSaving)]
    assert saves == [out_dir / f"{name}.safetensors" for name in want["saves"]]
    warnings = [e.text for e in events if isinstance(e, TrainerLog) and e.level == "warning"]
    assert warnings == want["warnings"]  # the Japanese text survived 7-byte reads
    assert not any("\ufffd" in text for text in recorder.logs())
    # kohya announces a save before writing it: the file was absent or partial when the event arrived
    full = {path.name: path.stat().st_size for path in saves}
    assert all(recorder.sizes_at_announce[name] < full[name] for name in full)
    for path in saves:
        with safe_open(str(path), framework="numpy") as f:
            assert (int(f.metadata()["ss_steps"]), int(f.metadata()["ss_epoch"])) == SAVES[path.name]
    assert elapsed < REPLAY_SECONDS + len(saves) * (SAVE_SECONDS + 0.1) + 20


# -- arguments passed literally ----------------------------------------------------------------------------


def test_argv_is_passed_literally_and_child_runs_as_configured(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    victim = tmp_path / "sd-scripts" / "x"
    sd_scripts = sd_scripts_with(tmp_path, ECHO_SCRIPT)
    victim.write_text("still here", encoding="utf-8")
    args: dict[str, Any] = {
        "output_dir": str(tmp_path / "out dir"),
        "output_name": "a; echo hi",
        "network_args": ["conv_dim=4", "$(rm -rf x)"],
        "training_comment": "日本語 'single' \"double\" `tick` \\ *",
        "learning_rate": 1e-4,
        "cache_latents": True,
        "flip_aug": False,
    }
    echo_to = tmp_path / "echo.json"
    recorder = Recorder()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as when started from a background job
    try:
        proc = run_to_end(KohyaConfig(sd_scripts=sd_scripts, args=args), recorder,
                          env={"ECHO_TO": str(echo_to), "EXTRA_VAR": "yes"})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.returncode == 0
    report = json.loads(echo_to.read_text(encoding="utf-8"))
    assert report["argv"] == [
        "--output_dir", str(tmp_path / "out dir"), "--output_name", "a; echo hi",
        "--network_args", "conv_dim=4", "$(rm -rf x)",
        "--training_comment", "日本語 'single' \"double\" `tick` \\ *",
        "--learning_rate", "0.0001", "--cache_latents",
    ]
    assert report["unbuffered"] == "1" and report["columns"] == kohya_process.DEFAULT_COLUMNS
    assert report["extra"] == "yes" and report["own_group"] and report["cwd"] == str(sd_scripts)
    assert report["sigint_default"], "an ignored SIGINT leaked into kohya"
    assert victim.read_text(encoding="utf-8") == "still here"
    assert "hi" not in recorder.logs()


# -- stopping ------------------------------------------------------------------------------------------------


def test_stop_escalates_to_sigkill_and_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(kohya_process, "TERM_WAIT_S", 0.5)
    recorder = Recorder()
    proc = KohyaProcess(build_argv(KohyaConfig(sd_scripts=sd_scripts_with(tmp_path, STUBBORN_SCRIPT))),
                        cwd=tmp_path, on_event=recorder)
    proc.start()
    recorder.wait_for_log("ready")
    recorder.wait_for_log("grandchild up")
    pgid = proc.pid
    assert pgid is not None
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="lora_monitor.kohya.process"):
        code = proc.stop(grace_s=0.5)
    assert time.monotonic() - started < 10
    assert code == 128 + signal.SIGKILL == proc.returncode
    sent = [r.message.split()[1] for r in caplog.records if r.message.startswith("sending")]
    assert sent == ["SIGINT", "SIGTERM", "SIGKILL"]
    assert group_is_gone(pgid), "a process of kohya's group survived"
    assert recorder.events[-1] == TrainerExited(137, tuple(proc.parser.last_lines))
    assert proc.wait(timeout=0) == 137


def test_stop_with_sigint_is_enough_for_a_python_trainer(tmp_path: Path) -> None:
    recorder = Recorder()
    proc = KohyaProcess(build_argv(KohyaConfig(sd_scripts=sd_scripts_with(tmp_path, INTERRUPTIBLE_SCRIPT))),
                        cwd=tmp_path, on_event=recorder)
    proc.start()
    recorder.wait_for_log("ready")
    assert proc.returncode is None
    code = proc.stop(grace_s=20)
    assert code == 130  # KeyboardInterrupt: Python ends itself with SIGINT
    exited = recorder.events[-1]
    assert isinstance(exited, TrainerExited) and exited.last_lines[-1] == "KeyboardInterrupt"
    assert any(e.level == "error" and e.text.startswith("KeyboardInterrupt")
               for e in recorder.events if isinstance(e, TrainerLog))
    assert group_is_gone(proc.pid or 0)


def test_failed_trainer_reports_its_code_and_last_lines(tmp_path: Path) -> None:
    recorder = Recorder()
    proc = run_to_end(KohyaConfig(sd_scripts=sd_scripts_with(tmp_path, FAILING_SCRIPT)), recorder)
    exited = recorder.events[-1]
    assert isinstance(exited, TrainerExited)
    assert exited.returncode == 1 == proc.returncode
    assert len(exited.last_lines) == 20 and exited.last_lines[-1] == "ValueError: boom"
    assert "line 24" in exited.last_lines
    assert sum(isinstance(e, TrainerExited) for e in recorder.events) == 1


def test_start_with_a_missing_python_is_a_user_error(tmp_path: Path) -> None:
    proc = KohyaProcess([str(tmp_path / "no-python"), "-u", "x.py"], cwd=tmp_path, on_event=lambda e: None)
    with pytest.raises(UserError, match="cannot start kohya"):
        proc.start()


def test_a_failing_event_handler_does_not_stop_reading(tmp_path: Path) -> None:
    seen: list[object] = []

    def handler(event: object) -> None:
        seen.append(event)
        raise RuntimeError("consumer bug")

    proc = KohyaProcess(build_argv(KohyaConfig(sd_scripts=sd_scripts_with(tmp_path, FAILING_SCRIPT))),
                        cwd=tmp_path, on_event=handler)
    proc.start()
    assert proc.wait(timeout=30) == 1
    assert isinstance(seen[-1], TrainerExited) and len(seen) > 25


@pytest.mark.parametrize(("returncode", "expected"), [(0, 0), (1, 1), (-2, 130), (-9, 137), (-15, 143)])
def test_exit_code(returncode: int, expected: int) -> None:
    assert exit_code(returncode) == expected


# -- kohya.log: the output as it came --------------------------------------------------------------------------

# Each unit is one write: stdout and stderr are two pipes read by two threads, so the log keeps each write
# whole but their order across the pipes is the order the threads read them in (as a terminal shows them).
CHATTY_SCRIPT = r'''
import sys, time
sys.stdout.write("epoch 1/1\n")
sys.stderr.write("\rsteps:   0%|          | 0/2 [00:00<?, ?it/s]"
                 "\rsteps:  50%|#####     | 1/2 [00:01<00:01,  1.00s/it, avr_loss=0.5]")
sys.stderr.flush()
if "--hold" in sys.argv:
    time.sleep(30)
sys.stdout.write("bytes \xe9\x00 end\n")
'''


def _log_run(tmp_path: Path, log_path: Path, recorder: Recorder, *extra: str) -> KohyaProcess:
    argv = [*build_argv(KohyaConfig(sd_scripts=sd_scripts_with(tmp_path, CHATTY_SCRIPT))), *extra]
    proc = KohyaProcess(argv, cwd=tmp_path / "sd-scripts", on_event=recorder, log_path=log_path)
    proc.start()
    return proc


def test_kohya_log_keeps_the_raw_output_per_launch(tmp_path: Path) -> None:
    log_path = tmp_path / "out" / "kohya.log"
    log_path.parent.mkdir()
    for _ in range(2):
        assert _log_run(tmp_path, log_path, Recorder()).wait(timeout=60) == 0
    data = log_path.read_bytes()
    assert data.count(b"==== ") == 4  # header and exit line of each launch
    header, *_ = data.split(b"\n")
    assert b"lora-monitor started kohya in" in header and b"train_network.py" in header
    assert data.count(b"kohya exited with code 0") == 2
    # tqdm's redraws with their carriage returns, stdout's lines, bytes as written
    assert data.count(b"\rsteps:   0%|          | 0/2 [00:00<?, ?it/s]\rsteps:  50%|") == 2
    assert data.count(b"epoch 1/1\n") == 2 and data.count("bytes \xe9\x00 end\n".encode()) == 2


def test_kohya_log_is_written_as_kohya_prints(tmp_path: Path) -> None:
    log_path = tmp_path / "kohya.log"
    proc = _log_run(tmp_path, log_path, Recorder(), "--hold")
    try:
        deadline = time.monotonic() + 30
        while b"avr_loss=0.5" not in log_path.read_bytes():  # kohya still running: nothing was closed or flushed
            assert time.monotonic() < deadline, log_path.read_bytes()
            time.sleep(0.05)
    finally:
        proc.stop(grace_s=5)


def test_kohya_log_that_cannot_be_opened_is_one_warning_and_kohya_runs(tmp_path: Path) -> None:
    log_path = tmp_path / "kohya.log"
    log_path.mkdir()  # root cannot write here either
    recorder = Recorder()
    assert _log_run(tmp_path, log_path, recorder).wait(timeout=60) == 0
    warnings = [e for e in recorder.events if isinstance(e, TrainerLog) and e.stream == "monitor"]
    assert len(warnings) == 1 and warnings[0].level == "warning" and str(log_path) in warnings[0].text
    assert any(isinstance(e, TrainProgress) for e in recorder.events)
    assert list(log_path.iterdir()) == []


def test_kohya_log_whose_header_cannot_be_written_leaves_no_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kohya_console_log.os, "write", full)
    log_path = tmp_path / "kohya.log"
    with pytest.raises(OSError):
        kohya_console_log.ConsoleLog.open(log_path, ["python", "x.py"], tmp_path)
    assert not log_path.exists()


def test_kohya_log_write_failure_is_reported_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = kohya_console_log.ConsoleLog.open(tmp_path / "kohya.log", ["python", "x.py"], tmp_path)

    def full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(kohya_console_log.os, "write", full)
    first = log.write(b"steps\n")
    assert first is not None and "No space left on device" in first
    assert log.write(b"more\n") is None
