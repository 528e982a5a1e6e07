"""What `train` and `eval-dir` share: the run's state (tracker, view, pending results, decisions) and helpers.

One main thread owns the tracker and the view; the trainer's reader threads, the watcher and the
evaluation worker only put events on one queue. A row is written once the trainer has shown its final
`avr_loss` for that step (kohya redraws the step after the save) or has exited.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

from lora_monitor import events as ev
from lora_monitor.config import Config
from lora_monitor.decisions import Decisions
from lora_monitor.eval_schedule import EvalSchedule
from lora_monitor.live import LiveView
from lora_monitor.lora_files import is_final_name, step_from_name, step_of
from lora_monitor.rows import TrainerFacts, build_row, epoch_from_metadata
from lora_monitor.tracker import METRIC_NAMES, Tracker

log = logging.getLogger(__name__)
LOSS_WAIT_S = 60.0  # longest a finished evaluation waits for kohya's post-save loss redraw


class _EveryCheckpoint:
    """No [eval] schedule: every file kohya saves, also an epoch file saved at the step of a step file."""

    def should_eval(self, step: int | None, is_final: bool) -> bool:
        return True


def schedule_of(config: Config) -> EvalSchedule | _EveryCheckpoint:
    """[eval] every_n_steps or dynamic_schedule; with neither, every checkpoint kohya saves is evaluated."""
    if config.eval.dynamic_schedule:
        return EvalSchedule(dynamic=[(int(a), int(b)) for a, b in config.eval.dynamic_schedule])
    if config.eval.every_n_steps:
        return EvalSchedule(every_n_steps=config.eval.every_n_steps)
    return _EveryCheckpoint()


def ready_of(path: Path, output_name: str | None) -> ev.CheckpointReady:
    step = step_of(path)
    return ev.CheckpointReady(
        path=path, step=step, epoch=step_from_name(path)[1], is_final=is_final_name(path, output_name)
    )


def _sort_key(path: Path, output_name: str | None) -> tuple[int, int, str]:
    step = step_of(path)
    final = is_final_name(path, output_name)
    return (step if step is not None else 10**12, 1 if final else 0, path.name)


def logging_dir_of(config: Config, output_dir: Path) -> Path:
    value = config.kohya.args.get("logging_dir") if config.kohya else None
    return Path(value) if value else output_dir / "logs"


def _tensorboard_of(config: Config, output_dir: Path) -> object | None:
    """lora-monitor's own TensorBoard run beside kohya's, when [output] tensorboard = true."""
    if not config.output.tensorboard:
        return None
    from lora_monitor.tb_writer import TensorBoardWriter

    return TensorBoardWriter(logging_dir_of(config, output_dir))


class _Loop:
    """State shared by train and eval-dir: the tracker, the view, pending results and the decisions."""

    def __init__(self, config: Config, output_dir: Path, csv_path: Path, view: LiveView, primary: bool = True) -> None:
        self.config = config
        self.output_dir = output_dir
        self.view = view
        self.tracker = Tracker(csv_path)
        self.facts = TrainerFacts()
        self.events: queue.Queue = queue.Queue()
        self.decisions = Decisions(config, output_dir, self.tracker)
        self.primary = primary  # only the primary process publishes best.json and the report
        self.waiting: list[tuple[float, ev.EvalResult]] = []
        self.redraws: dict[int, int] = {}  # how often kohya drew each step (the loss is final on the 2nd)
        self.fatal: str | None = None
        self.stop_reason: str | None = None
        self.tensorboard = _tensorboard_of(config, output_dir)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _to_tensorboard(self, row: dict[str, str], checkpoint: Path) -> None:
        if self.tensorboard is None or row.get("status") != "ok" or not row.get("step"):
            return
        from PIL import Image

        metrics = {k: float(row[k]) for k in METRIC_NAMES if row.get(k)}
        folder = self.output_dir / "eval" / checkpoint.stem
        images = []
        for path in sorted(folder.glob("[0-9][0-9].png")):
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        try:
            self.tensorboard.add_row(int(row["step"]), metrics, images or None)
        except OSError as exc:
            self.view.message(f"warning: TensorBoard row not written ({exc})")

    def write_result(self, result: ev.EvalResult) -> None:
        self.facts.lr_at_step.update(self.decisions.learning_rates())
        epoch_hint = epoch_from_metadata(result.checkpoint) if result.checkpoint.exists() else None
        row = self.tracker.append(build_row(result, self.facts, epoch_hint))
        self.view.add_row(row)
        self._to_tensorboard(row, result.checkpoint)
        if not self.primary:
            return
        verdict = self.decisions.after_row(row, result.checkpoint)
        self.view.set_best(verdict.best_text)
        self.view.set_patience(verdict.patience_text)
        if verdict.stop and self.stop_reason is None:
            self.stop_reason = verdict.reason
            self.view.message(f"early stop: {verdict.reason}")
            self.decisions.record_early_stop(str(verdict.reason), row)

    def handle_common(self, item: Any) -> bool:
        if isinstance(item, ev.EvalResult):
            self.waiting.append((time.monotonic(), item))
        elif isinstance(item, tuple) and item[0] == "warning":
            self.view.message(f"warning: {item[1]}")
        elif isinstance(item, tuple) and item[0] == "fatal":
            self.fatal = item[1]
            self.view.message(f"evaluation disabled: {item[1]}")
        elif isinstance(item, tuple) and item[0] == "removed":
            self.view.message(f"{item[1].name}: deleted before it was complete; skipped")
        else:
            return False
        return True


class _SignalCatcher:
    """Ctrl-C / SIGTERM on the monitor: remember it; the loop stops kohya as the process rules say."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _SignalCatcher:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
