"""After kohya has ended: the queued evaluations are named with a countdown, and Ctrl-C (a real SIGINT to
this process) skips them at once, leaving them for eval-dir while the evaluation in hand ends cleanly."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from lora_monitor.config import parse_config
from lora_monitor.evaluation.worker import EvalWorker, Models, drain
from lora_monitor.events import CheckpointReady, EvalResult
from lora_monitor.finish_evals import countdown, finish_evaluations, seconds_each, seconds_left, waiting_text
from lora_monitor.run_spec import eval_dir_spec
from lora_monitor.run_state import RunState, SignalCatcher
from lora_monitor.tracking.live import LiveView
from lora_monitor.tracking.rows import TrainingValues

GUARD_S = 60.0  # a deadlock guard for the helper thread, not a speed requirement


@pytest.mark.parametrize(
    ("each", "queued", "elapsed", "left"),
    [(None, 3, 0.0, None), (20.0, 2, 5.0, 55.0), (20.0, 0, 25.0, 0.0), (10.0, 1, 0.0, 20.0)],
)
def test_seconds_left(each: float | None, queued: int, elapsed: float, left: float | None) -> None:
    assert seconds_left(each, queued, elapsed) == left


@pytest.mark.parametrize(
    ("rows", "each"),
    [
        ([], None),
        ([{"status": "ok", "eval_seconds": "10"}, {"status": "duplicate", "eval_seconds": ""},
          {"status": "failed", "eval_seconds": "1"}, {"status": "ok", "eval_seconds": "20"}], 15.0),
        ([{"status": "ok", "eval_seconds": str(s)} for s in (100, 1, 2, 3, 4, 5)], 3.0),  # the latest 5 only
    ],
)
def test_seconds_each_averages_recent_timed_rows(rows: list[dict], each: float | None) -> None:
    assert seconds_each(rows) == each


@pytest.mark.parametrize(
    ("in_hand", "queued", "signalled", "text"),
    [
        ("c.safetensors", ["a.safetensors", "b.safetensors"], True,
         "kohya has ended; evaluating c.safetensors (2 queued: a.safetensors, b.safetensors); Ctrl-C again to skip"),
        ("c", [], False, "kohya has ended; evaluating c; Ctrl-C to skip"),
        (None, ["a", "b", "c", "d", "e"], False,
         "kohya has ended; starting the evaluator (5 queued: a, b, c and 2 more); Ctrl-C to skip"),
    ],
)
def test_waiting_text(in_hand: str | None, queued: list[str], signalled: bool, text: str) -> None:
    assert waiting_text(in_hand, queued, signalled) == text + " (left for `lora-monitor eval-dir`)"


def test_countdown() -> None:
    assert countdown(40.2) == "~41 s left" and "unknown" in countdown(None)


# --- the loop, with a real worker thread and real signals --------------------------------------------------

class GatedEvaluator:
    """Generation that holds until the test opens the gate (the evaluation 'in hand')."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def generate(self, path: Path) -> SimpleNamespace:
        assert self.gate.wait(GUARD_S)
        return SimpleNamespace(images=[], prompts=[])

    def save(self, path: Path, step: int | None, generated: object) -> None:
        pass


class FixedScorer:
    def score(self, images: list, prompts: list) -> dict[str, float]:
        return {"eval_score": 0.5}


class FinishingRun:
    """The parts of a train run that finishing uses: rows are written as results come (kohya has ended)."""

    def __init__(self, tmp_path: Path, caught: SignalCatcher) -> None:
        self.spec = eval_dir_spec(parse_config("", tmp_path / "c.toml"), tmp_path)
        self.stream = io.StringIO()
        self.view = LiveView(stream=self.stream, live=False)
        self.state = RunState(self.spec, self.view)
        self.caught = caught
        self.evaluator = GatedEvaluator()
        models = Models(evaluator=self.evaluator, scorer=FixedScorer(), output_dir=tmp_path)
        self.worker = EvalWorker(lambda: models, self.state.events.put, newest_first=True)
        for step in (2, 4, 6):
            path = tmp_path / f"a-step{step:08d}.safetensors"
            save_file({"lora_unet_x.lora_down.weight": torch.full((2, 2), float(step))}, str(path))
            self.worker.submit(CheckpointReady(path, step))
        self.worker.start()
        end = time.monotonic() + GUARD_S
        while self.worker.busy_with is None and time.monotonic() < end:  # the newest is in hand
            time.sleep(0.01)

    def pump(self, timeout: float) -> list[object]:
        for item in drain(self.state.events, timeout):
            if isinstance(item, EvalResult):
                self.state.write_result(item, TrainingValues())
        return []

    def lines(self) -> list[str]:
        return [line.removeprefix("[lora-monitor] ") for line in self.stream.getvalue().splitlines()]


def _when(cond, then) -> threading.Thread:  # noqa: ANN001
    def run() -> None:
        end = time.monotonic() + GUARD_S
        while not cond() and time.monotonic() < end:
            time.sleep(0.02)
        then()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_again_skips_the_queue_and_the_evaluation_in_hand_ends(tmp_path: Path) -> None:
    with SignalCatcher() as caught:
        _ctrl_c()  # the Ctrl-C that stopped kohya
        run = FinishingRun(tmp_path, caught)
        _when(lambda: "evaluating a-step00000006" in (run.view.status or ""), _ctrl_c)
        _when(lambda: any("skipped" in m for m in run.view.messages), run.evaluator.gate.set)
        finish_evaluations(run)
        assert caught.signum == signal.SIGINT  # the exit code stays the first signal's
    lines = run.lines()
    assert ("kohya has ended; evaluating a-step00000006.safetensors (2 queued: a-step00000002.safetensors, "
            "a-step00000004.safetensors); Ctrl-C again to skip (left for `lora-monitor eval-dir`) "
            "(time left unknown until an evaluation is timed)") in lines
    assert ("skipped 2 queued evaluation(s), left for `lora-monitor eval-dir`: a-step00000002.safetensors, "
            "a-step00000004.safetensors") in lines
    assert [r["checkpoint"] for r in run.state.tracker.rows] == ["a-step00000006.safetensors"]  # in hand: kept
    assert not run.worker.alive() and run.view.status is None


def test_ctrl_c_twice_while_kohya_stopped_skips_at_once(tmp_path: Path) -> None:
    with SignalCatcher() as caught:
        _ctrl_c()
        _ctrl_c()  # pressed again while kohya was still stopping
        run = FinishingRun(tmp_path, caught)
        _when(lambda: any("skipped" in m for m in run.view.messages), run.evaluator.gate.set)
        finish_evaluations(run)
    assert not any("Ctrl-C again to skip" in line for line in run.lines())
    assert any(line.startswith("skipped") for line in run.lines())
    assert len(run.state.tracker.rows) <= 1 and not run.worker.alive()


def test_without_ctrl_c_every_queued_checkpoint_is_evaluated(tmp_path: Path) -> None:
    with SignalCatcher() as caught:
        run = FinishingRun(tmp_path, caught)
        run.evaluator.gate.set()
        finish_evaluations(run)
        assert caught.signum is None
    assert sorted(r["checkpoint"] for r in run.state.tracker.rows) == [
        f"a-step{s:08d}.safetensors" for s in (2, 4, 6)]
    assert not any("skipped" in line for line in run.lines())
