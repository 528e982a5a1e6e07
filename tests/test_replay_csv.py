"""The captured kohya runs, replayed through `lora-monitor train`, give the fixture's values in the CSV.

A stand-in `train_network.py` writes the captured stdout/stderr bytes at their (squeezed) times, logs the
captured TensorBoard scalars, and writes real LoRA files for the tiny demo model in place, slowly, exactly
when and under the names kohya did. The monitor runs for real (subprocess, watcher, evaluator, tracker).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
import pytest

from tests.conftest import cli, run_demo_trainer, start_cli, write_config
from tests.kohya_replay import FIXTURE_OUT, FIXTURES, SAVES, SAVING_RE, merged, replay_plan

TRAINER = Path(__file__).resolve().parent.parent / "lora_monitor" / "demo" / "sd_scripts" / "train_network.py"
REPLAY_SECONDS = 4.0  # the captured 238 s run, squeezed
SIGINT_SECONDS = 2.0  # the interrupted run up to its first save (it has no timeline: spread evenly)
SAVE_SECONDS = 0.6  # each LoRA file is written over this long ...
SAVE_PIECES = 6  # ... in this many writes
STEP_BAR = re.compile(r"\| *(\d+)/\d+ \[")
METRICS = ["visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score"]
PROMPTS = (
    "a photo of a red dress, sks style --d 1\n"
    "a red dress on a white background, sks style --d 2\n"
)
# The fixture's saves, in kohya's order: (step, epoch, total_loss, status). total_loss is the last avr_loss
# drawn with the step (after the save), 3 significant digits; the CSV holds the same value at full precision
# from kohya's TensorBoard `loss/average`. The epoch and final files repeat a step file's weights.
EXPECTED_ROWS: dict[str, tuple[int, int, float, str]] = {
    "testlora-step00000002.safetensors": (2, 1, 1.1, "ok"),
    "testlora-step00000004.safetensors": (4, 1, 1.14, "ok"),
    "testlora-000001.safetensors": (4, 1, 1.14, "duplicate"),
    "testlora-step00000006.safetensors": (6, 2, 1.22, "ok"),
    "testlora.safetensors": (6, 2, 1.22, "duplicate"),
}
TWIN_OF = {"testlora-000001.safetensors": "testlora-step00000004.safetensors",
           "testlora.safetensors": "testlora-step00000006.safetensors"}

# Runs in place of kohya: replay.json beside it says what to write and when.
STAND_IN = r'''
import json, os, signal, sys, time
from pathlib import Path

here = Path(__file__).resolve().parent
plan = json.loads((here / "replay.json").read_text(encoding="utf-8"))


def option(name):
    return sys.argv[sys.argv.index("--" + name) + 1]


out_dir, logging_dir = Path(option("output_dir")), Path(option("logging_dir"))


def write(stream, text):
    data = text.replace(plan["fixture_out"], str(out_dir)).encode("utf-8")
    target = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    target.write(data)
    target.flush()


def save(name, source):
    data = Path(source).read_bytes()
    pieces = plan["pieces"]
    with open(out_dir / name, "wb") as f:  # in place, like kohya: no temporary name, no rename
        for i in range(pieces):
            f.write(data[i * len(data) // pieces:(i + 1) * len(data) // pieces])
            f.flush()
            time.sleep(plan["save_s"] / pieces)


class Scalars:
    """kohya's TensorBoard run: logging_dir/<YYYYmmddHHMMSS>/network_train, flushed after each step."""

    def __init__(self):
        self.writer = None

    def log(self, step, values):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        if self.writer is None:
            run = logging_dir / time.strftime("%Y%m%d%H%M%S") / "network_train"
            self.writer = EventFileWriter(str(run))
        summary = Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in values.items()])
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()


def replay(actions):
    scalars = Scalars()
    start, lag = time.monotonic(), 0.0
    for action in actions:
        pause = start + action["t"] + lag - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        if "save" in action:
            began = time.monotonic()
            time.sleep(0.1)
            save(action["save"], action["source"])
            lag += time.monotonic() - began
        elif "scalars" in action:
            scalars.log(action["step"], action["scalars"])
        elif "wait_for_interrupt" in action:
            (here / "waiting").write_text(str(os.getpid()))
            time.sleep(120)
            sys.exit("no SIGINT came")
        else:
            write(action["stream"], action["data"])


try:
    replay(plan["actions"])
except KeyboardInterrupt:
    # what Python itself does: the traceback on stderr, then death by SIGINT (exit status 130)
    write("stderr", plan["on_interrupt"])
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
'''


def fixture_scalars() -> dict[int, dict[str, float]]:
    """tensorboard_scalars.txt as step -> {tag: value}; loss/epoch_average is logged per epoch, not step."""
    text = (FIXTURES / "run-python-u" / "tensorboard_scalars.txt").read_text(encoding="utf-8")
    by_step: dict[int, dict[str, float]] = {}
    for line in text.splitlines()[1:]:
        tag, pairs = line.split(maxsplit=1)
        if tag == "loss/epoch_average":
            continue
        for step, value in re.findall(r"\((\d+), ([-\d.e]+)\)", pairs):
            by_step.setdefault(int(step), {})[tag] = float(value)
    return by_step


def with_scalars(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """kohya logs a step's scalars after drawing the step for the last time (after any save)."""
    scalars = fixture_scalars()
    last_draw: dict[int, int] = {}
    for i, action in enumerate(actions):
        if action.get("stream") == "stderr":
            for step in STEP_BAR.findall(str(action["data"])):
                last_draw[int(step)] = i
    out: list[dict[str, Any]] = []
    for i, action in enumerate(actions):
        out.append(action)
        for step in sorted(s for s, at in last_draw.items() if at == i and s in scalars):
            out.append({"t": action["t"], "step": step, "scalars": scalars[step]})
    return out


def sigint_plan(seconds: float) -> tuple[list[dict[str, Any]], str]:
    """run-sigint up to the KeyboardInterrupt (then wait for SIGINT), and the text written after it."""
    chunks = merged("run-sigint")
    last = chunks[-1].text
    cut = last.index("Traceback (most recent call last)")
    texts = [(c.stream, c.text) for c in chunks[:-1]] + [("stderr", last[:cut])]
    actions: list[dict[str, Any]] = []
    for i, (stream, text) in enumerate(texts):
        t = seconds * i / (len(texts) - 1)
        actions.append({"t": t, "stream": stream, "data": text})
        m = SAVING_RE.search(text) if stream == "stdout" else None
        if m:
            steps, epoch = SAVES[m.group("name")]
            actions.append({"t": t, "save": m.group("name"), "ss_steps": steps, "ss_epoch": epoch})
    actions = with_scalars(actions)
    actions.append({"t": seconds, "wait_for_interrupt": True})
    return actions, last[cut:]


# -- real LoRA files for the tiny model, named and labelled as the fixture's ------------------------------------


@pytest.fixture(scope="module")
def fixture_loras(tmp_path_factory: pytest.TempPathFactory, demo_assets: Any) -> dict[str, Path]:
    """name -> a LoRA file for the tiny demo model with the fixture run's ss_steps/ss_epoch.

    Three real checkpoints (demo trainer, steps 1-3) stand for kohya's steps 2, 4 and 6; the epoch-1 file
    repeats step 4's tensors and the final file step 6's, as kohya's did.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("fixture-loras")
    trained = folder / "trained"
    run_demo_trainer(trained, demo_assets, "demo", max_train_steps=3, save_every_n_steps=1)
    files = {}
    for name, (steps, epoch) in SAVES.items():
        source = trained / f"demo-step{steps // 2:08d}.safetensors"
        with safe_open(str(source), framework="pt") as f:
            metadata = dict(f.metadata())
        metadata.update(ss_steps=str(steps), ss_epoch=str(epoch), ss_output_name="testlora")
        files[name] = folder / name
        save_file(load_file(str(source)), str(files[name]), metadata=metadata)
    return files


def stand_in(tmp_path: Path, actions: list[dict[str, Any]], loras: dict[str, Path], run: str,
             on_interrupt: str = "") -> Path:
    """A kohya folder holding the stand-in train_network.py and its replay.json."""
    folder = tmp_path / "sd-scripts"
    folder.mkdir()
    for action in actions:
        if "save" in action:
            action["source"] = str(loras[str(action["save"])])
    plan = {"actions": actions, "fixture_out": FIXTURE_OUT[run], "save_s": SAVE_SECONDS, "pieces": SAVE_PIECES,
            "on_interrupt": on_interrupt}
    (folder / "replay.json").write_text(json.dumps(plan), encoding="utf-8")
    (folder / "train_network.py").write_text(STAND_IN, encoding="utf-8")
    return folder


def replay_config(workdir: Path, demo_assets: Any, sd_scripts: Path) -> Path:
    """The demo config with the fixture run's kohya arguments and the stand-in as kohya."""
    prompts = workdir / "prompts.txt"
    workdir.mkdir(parents=True, exist_ok=True)
    prompts.write_text(PROMPTS, encoding="utf-8")
    kohya = {"output_name": "testlora", "max_train_steps": 6, "save_every_n_steps": 2, "save_every_n_epochs": 1,
             "learning_rate": 1e-4, "train_batch_size": 1, "network_dim": 4}
    config = write_config(workdir, demo_assets, kohya=kohya,
                          eval_={"steps": 2, "prompts": str(prompts), "batch_size": 2,
                                 "seeds_per_prompt": 1, "holdout": False})  # one image a prompt
    text = config.read_text(encoding="utf-8")
    line = f"sd_scripts = {json.dumps(str(demo_assets.sd_scripts))}"
    assert line in text
    config.write_text(text.replace(line, f"sd_scripts = {json.dumps(str(sd_scripts))}"), encoding="utf-8")
    return config


def rows_by_name(csv_path: Path) -> pd.DataFrame:
    """The checkpoints' rows by file name, after the base model's baseline row (which comes first)."""
    rows = pd.read_csv(csv_path)
    assert rows["status"].iloc[0] == "baseline", rows.head(2).to_dict()
    rows = rows.iloc[1:]
    assert rows["checkpoint"].is_unique, rows["checkpoint"].tolist()
    return rows.set_index("checkpoint")


def kohya_left(sd_scripts: Path) -> list[psutil.Process]:
    """Processes still running the stand-in (zombies waiting for init to reap them do not count)."""
    left = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and str(sd_scripts) in " ".join(p.info["cmdline"] or []):
            left.append(p)
    return left


def assert_ok_row(row: pd.Series, out: Path, name: str) -> None:
    for column in METRICS:
        assert math.isfinite(float(row[column])), (name, column)
    images = sorted((out / "eval" / Path(name).stem).glob("[0-9][0-9].png"))
    assert len(images) == PROMPTS.count("\n"), name


# -- the complete run -----------------------------------------------------------------------------------------


def test_replayed_run_gives_the_fixture_steps_losses_epochs_and_checkpoints(
        tmp_path: Path, demo_assets: Any, fixture_loras: dict[str, Path]) -> None:
    actions = with_scalars(replay_plan("run-python-u", REPLAY_SECONDS))
    sd_scripts = stand_in(tmp_path, actions, fixture_loras, "run-python-u")
    config = replay_config(tmp_path, demo_assets, sd_scripts)
    started = time.monotonic()
    result = cli("train", "--config", str(config), cwd=tmp_path, timeout=180)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    out = tmp_path / "output"
    for name in EXPECTED_ROWS:  # kohya's files, complete and unchanged
        assert (out / name).read_bytes() == fixture_loras[name].read_bytes(), name
    rows = rows_by_name(out / "loss_tracker.csv")
    assert sorted(rows.index) == sorted(EXPECTED_ROWS)  # exactly one row per file
    for name, (step, epoch, loss, status) in EXPECTED_ROWS.items():
        row = rows.loc[name]
        assert (int(row["step"]), int(row["epoch"]), row["status"]) == (step, epoch, status), (name, row.to_dict())
        logged = fixture_scalars()[step]["loss/average"]
        assert float(row["total_loss"]) == pytest.approx(logged, rel=1e-6), name  # TensorBoard: float32
        assert float(f"{float(row['total_loss']):.3g}") == loss, name  # what kohya printed for the step
        assert float(row["learning_rate"]) == pytest.approx(1e-4, rel=1e-6), name
        if status == "ok":
            assert_ok_row(row, out, name)
        else:
            twin = TWIN_OF[name]
            assert twin in str(row["note"]), row["note"]
            assert [float(row[c]) for c in METRICS] == [float(rows.loc[twin, c]) for c in METRICS]
            assert not (out / "eval" / Path(name).stem).exists()  # nothing generated again
    assert kohya_left(sd_scripts) == []
    print(f"replayed run: {elapsed:.1f} s", file=sys.stderr)


# -- the run interrupted after its first save -----------------------------------------------------------------


def test_sigint_after_the_first_save_evaluates_it_and_leaves_no_kohya(
        tmp_path: Path, demo_assets: Any, fixture_loras: dict[str, Path]) -> None:
    actions, on_interrupt = sigint_plan(SIGINT_SECONDS)
    sd_scripts = stand_in(tmp_path, actions, fixture_loras, "run-sigint", on_interrupt)
    config = replay_config(tmp_path, demo_assets, sd_scripts)
    proc = start_cli("train", "--config", str(config), cwd=tmp_path)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        while not (m := re.search(r"kohya started \(pid (\d+)\)", lines[-1] if lines else "")):
            line = proc.stdout.readline()
            assert line, "monitor ended before kohya started: " + "".join(lines)
            lines.append(line)
        kohya_pid = int(m.group(1))
        deadline = time.monotonic() + 60
        while not (sd_scripts / "waiting").exists():  # saved, and the next step drawn: as when Ctrl-C came
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + output
    assert proc.returncode == 130, output[-4000:]
    assert time.monotonic() - started < 60
    with pytest.raises(ProcessLookupError):
        os.killpg(kohya_pid, 0)  # nothing of kohya's process group remains
    assert kohya_left(sd_scripts) == []
    assert "kohya: KeyboardInterrupt" in output  # kohya's traceback was read to its end

    out = tmp_path / "output"
    assert sorted(p.name for p in out.glob("*.safetensors") if not p.stem.endswith("-best")) == [
        "testlora-step00000002.safetensors"]
    rows = rows_by_name(out / "loss_tracker.csv")
    assert list(rows.index) == ["testlora-step00000002.safetensors"]
    row = rows.iloc[0]
    assert (int(row["step"]), int(row["epoch"]), row["status"]) == (2, 1, "ok")
    assert float(row["total_loss"]) == pytest.approx(fixture_scalars()[2]["loss/average"], rel=1e-6)
    assert float(f"{float(row['total_loss']):.3g}") == 1.1
    assert float(row["learning_rate"]) == pytest.approx(1e-4, rel=1e-6)
    assert_ok_row(row, out, "testlora-step00000002.safetensors")
