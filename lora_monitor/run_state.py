"""What `train` and `eval-dir` share: the run's state (tracker, view, pending results, decisions).

One main thread owns the tracker and the view; the trainer's reader threads, the watcher and the
evaluation worker only put events on one queue.

A row's total_loss, epoch and learning rate come from one place each, the same in both loops:
- total_loss and learning_rate: kohya's TensorBoard logs (`loss/average` at full precision, `lr/*`). Only
  when kohya logs no TensorBoard (`log_with = "wandb"`) does `train` fall back to the `avr_loss` kohya draws
  on its bar (3 significant digits).
- epoch: the `epoch n/N` kohya printed when it drew the step; else the file's `ss_epoch` metadata.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from pathlib import Path
from typing import Any

from lora_monitor import events as ev
from lora_monitor.columns import METRIC_NAMES, STRENGTH_COLUMNS, STRENGTHS_CSV
from lora_monitor.errors import UserError
from lora_monitor.kohya.tensorboard import StepFacts
from lora_monitor.policies.best_checkpoint import best_strength
from lora_monitor.policies.decisions import Decisions
from lora_monitor.policies.overtraining import baseline_of
from lora_monitor.run_spec import RunSpec
from lora_monitor.tracking.live import LiveView
from lora_monitor.tracking.rows import TrainingValues, build_row, epoch_from_metadata, strength_rows
from lora_monitor.tracking.tracker import Tracker

log = logging.getLogger(__name__)


def _tensorboard_of(spec: RunSpec) -> Any:
    """lora-monitor's own TensorBoard run beside kohya's, when [output] tensorboard = true."""
    if not spec.config.output.tensorboard:
        return None
    from lora_monitor.tracking.tensorboard_writer import TensorBoardWriter

    return TensorBoardWriter(spec.logging_dir or spec.output_dir / "logs")


class RunState:
    """State shared by train and eval-dir: the tracker, the view, pending results and the decisions."""

    def __init__(self, spec: RunSpec, view: LiveView) -> None:
        self.spec = spec
        self.output_dir = spec.output_dir
        self.view = view
        self.tracker = Tracker(spec.csv_path)
        self.events: queue.Queue[object] = queue.Queue()
        self.decisions = Decisions(spec, self.tracker)
        self.strengths: Tracker | None = None  # strengths.csv, opened at the first checkpoint with strengths
        self.waiting: list[tuple[float, ev.EvalResult]] = []
        self.printed_loss: dict[int, float] = {}  # step -> the last avr_loss kohya drew with it
        self.printed_epoch: dict[int, int] = {}  # step -> the epoch in force when kohya first drew it
        self._last_draw: tuple[int, float | None] | None = None  # (step, loss) of kohya's last redraw
        self.fatal: str | None = None
        self.unwritten: list[str] = []  # checkpoints whose row could not be written
        self.stop_reason: str | None = None
        self.stop_step: int | None = None
        self.tensorboard = _tensorboard_of(spec)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def note_progress(self, item: ev.TrainProgress) -> int | None:
        """Record one redraw of kohya's bar; returns the step its loss belongs to (None: no loss drawn).

        kohya moves the bar to step N (tqdm's update) before it sets N's avr_loss (set_postfix), so when the
        bar moves the first draw of N still carries the loss of the step drawn before; the next draw has
        N's own. A move to a later step that keeps the loss is that carry-over (should N's loss really equal
        it, the value shown is right either way). printed_loss keeps the last value drawn with each step,
        which is the step's own once the step is settled.
        """
        before, self._last_draw = self._last_draw, (item.step, item.loss)
        if item.step >= 1:
            if item.epoch is not None:
                self.printed_epoch.setdefault(item.step, item.epoch)
            if item.loss is not None:
                self.printed_loss[item.step] = item.loss
        if item.loss is None:
            return None
        if before is not None and before[0] < item.step and before[1] == item.loss:
            return before[0]
        return item.step

    def values_at(self, step: int | None, logs: StepFacts | None) -> TrainingValues:
        """The trainer's loss, epoch and learning rate at `step` (see the module docstring for the sources)."""
        if step is None:
            return TrainingValues()
        if logs is not None:
            loss, lr, val = logs.loss.get(step), logs.lr_at(step), logs.val_loss_at(step)
        else:
            loss, lr, val = self.printed_loss.get(step), None, None
        return TrainingValues(loss=loss, epoch=self.printed_epoch.get(step), learning_rate=lr, val_loss=val)

    def _to_tensorboard(self, row: dict[str, str], checkpoint: Path) -> None:
        if self.tensorboard is None or row.get("status") != "ok" or not row.get("step"):
            return
        from PIL import Image

        metrics = {k: float(row[k]) for k in METRIC_NAMES if row.get(k)}
        images = []
        for path in sorted(self.spec.eval_folder(checkpoint).glob("[0-9][0-9].png")):
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
        try:
            self.tensorboard.add_row(int(row["step"]), metrics, images or None)
        except OSError as exc:
            self.view.message(f"warning: TensorBoard row not written ({exc})")

    def write_result(self, result: ev.EvalResult, values: TrainingValues) -> None:
        if result.baseline:
            values = TrainingValues()  # the base model: no training step, no trainer values
        on_disk = not result.baseline and result.checkpoint.exists()
        epoch_hint = epoch_from_metadata(result.checkpoint) if on_disk else None
        self._write_strengths(result)
        row = build_row(result, values, epoch_hint)
        if result.by_strength and not result.error:
            best = self.spec.config.best
            row["best_strength"] = best_strength({1.0: result.metrics, **result.by_strength},
                                                 baseline_of(self.tracker.rows), best.rule, best.bounds())
        try:
            row = self.tracker.append(row)
        except UserError as exc:
            # A full disk or a CSV made read-only mid-run: the row is lost, not the run. The tracker left
            # no half row, so `eval-dir` evaluates this checkpoint again later.
            self.unwritten.append(result.checkpoint.name)
            self.view.message(f"{result.checkpoint.name}: row not written - {exc}; "
                              "`lora-monitor eval-dir` adds it later")
            return
        self.view.add_row(row)
        if not result.baseline:  # the baseline is a reference for the flags, never a candidate
            self._to_tensorboard(row, result.checkpoint)
        verdict = self.decisions.after_row(row)
        self.view.set_best(verdict.best_text)
        self.view.set_patience(verdict.patience_text)
        if verdict.stop and self.stop_reason is None:
            self.stop_reason = verdict.reason
            self.stop_step = int(row["step"]) if row.get("step") else None
            self.view.message(f"early stop: {verdict.reason}")
            self.decisions.record_early_stop(str(verdict.reason), row)

    def _write_strengths(self, result: ev.EvalResult) -> None:
        rows = strength_rows(result)
        if not rows:
            return
        try:
            if self.strengths is None:
                self.strengths = Tracker(self.spec.csv_path.with_name(STRENGTHS_CSV), STRENGTH_COLUMNS, None)
            for row in rows:
                self.strengths.append(row)
        except UserError as exc:
            self.view.message(f"{result.checkpoint.name}: strengths not written - {exc}")

    def handle_common(self, item: object, arrived: float) -> bool:
        if isinstance(item, ev.EvalResult):
            self.waiting.append((arrived, item))
        elif isinstance(item, ev.EvalWarning):
            self.view.message(f"warning: {item.text}")
        elif isinstance(item, ev.EvalDisabled):
            self.fatal = item.reason
            self.view.message(f"evaluation disabled: {item.reason}")
        elif isinstance(item, ev.FileDeleted):
            self.view.message(f"{item.path.name}: deleted before it was complete; skipped")
        else:
            return False
        return True


class SignalCatcher:
    """Ctrl-C / SIGTERM on the monitor: remember it; the loop stops kohya as the process rules say."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0  # signals received: after kohya has ended, one more skips the queued evaluations
        self._old: dict[int, Any] = {}

    def __enter__(self) -> SignalCatcher:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
