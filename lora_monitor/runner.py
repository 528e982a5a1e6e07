"""The run loop: kohya process -> output parser -> watcher -> evaluator -> tracker -> live view.

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
from lora_monitor.errors import UserError
from lora_monitor.eval_schedule import EvalSchedule
from lora_monitor.live import LiveView
from lora_monitor.lock import OutputLock
from lora_monitor.lora_files import is_final_name, step_from_name, step_of, why_incomplete
from lora_monitor.pipeline import EvalWorker, build_models, check_inputs, drain
from lora_monitor.rows import TrainerFacts, build_row, epoch_from_metadata
from lora_monitor.tracker import METRIC_NAMES, Tracker
from lora_monitor.watcher import CheckpointWatcher, is_candidate, list_checkpoints

log = logging.getLogger(__name__)
LOSS_WAIT_S = 60.0  # longest a finished evaluation waits for kohya's post-save loss redraw


def schedule_of(config: Config) -> EvalSchedule:
    """[eval] every_n_steps or dynamic_schedule; with neither, every checkpoint kohya saves is evaluated."""
    if config.eval.dynamic_schedule:
        return EvalSchedule(dynamic=[(int(a), int(b)) for a, b in config.eval.dynamic_schedule])
    return EvalSchedule(every_n_steps=config.eval.every_n_steps or 1)


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

    def __init__(self, config: Config, output_dir: Path, csv_path: Path, view: LiveView) -> None:
        self.config = config
        self.output_dir = output_dir
        self.view = view
        self.tracker = Tracker(csv_path)
        self.facts = TrainerFacts()
        self.events: queue.Queue = queue.Queue()
        self.decisions = Decisions(config, output_dir, self.tracker)
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
        verdict = self.decisions.after_row(row, result.checkpoint)
        self.view.set_best(verdict.best_text)
        self.view.set_patience(verdict.patience_text)
        if verdict.stop and self.stop_reason is None:
            self.stop_reason = verdict.reason
            self.view.message(f"early stop: {verdict.reason}")

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


def run_eval_dir(config: Config, folder: Path, csv_path: Path | None, watch: bool, view: LiveView) -> int:
    """Evaluate every LoRA in `folder` not yet in the CSV, in step order; with watch, keep going until Ctrl-C."""
    folder = folder.resolve()
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; give the kohya output folder to eval-dir")
    csv_path = csv_path or config.csv_path(folder) or folder / "loss_tracker.csv"
    _check_folder(folder, watch)
    inputs = check_inputs(config)
    if config.output.tensorboard:
        from lora_monitor.tb_writer import check_available

        check_available()
    with OutputLock(folder):
        loop = _Loop(config, folder, csv_path, view)
        output_name = config.output_name if config.kohya else None
        done = loop.tracker.done()
        schedule = schedule_of(config)
        sdxl = config.kohya.sdxl if config.kohya else False
        worker = EvalWorker(lambda: build_models(config, folder, inputs, sdxl), loop.events.put, newest_first=False)
        files = sorted(list_checkpoints(folder), key=lambda p: _sort_key(p, output_name))
        _report_unusable(loop, folder, files, done, watch)
        todo = [ready_of(p, output_name) for p in files if p.name not in done]
        todo = [r for r in todo if schedule.should_eval(r.step, r.is_final)]
        view.message(f"{len(files)} LoRA files in {folder}; {len(todo)} to evaluate, {len(files) - len(todo)} done")
        loop.facts = loop.decisions.facts_from_logs()
        worker.start()
        for r in todo:
            worker.submit(r)
        watcher = None
        if watch:
            seen = {p.name for p in files}
            watcher = CheckpointWatcher(folder, lambda p: worker.submit(ready_of(p, output_name)),
                                        lambda p: loop.events.put(("removed", p)), ignore=seen)
            watcher.start()
            view.message("watching for new checkpoints; Ctrl-C to stop")
        expected = len(todo)
        try:
            while watch or expected > 0:
                for item in drain(loop.events, 0.5):
                    loop.handle_common(item)
                    if isinstance(item, ev.EvalResult) and not watch:
                        expected -= 1
                for _, result in loop.waiting:
                    loop.write_result(result)
                loop.waiting.clear()
                view.set_queue([str(getattr(r, "path", r).name) for r in worker.pending()],
                               worker.busy_with.name if worker.busy_with else None)
                view.refresh()
                if loop.fatal and not watch:
                    break
        except KeyboardInterrupt:
            view.message("stopped (Ctrl-C); rows written so far are kept")
        finally:
            if watcher:
                watcher.stop()
        worker.close(timeout=1.0 if loop.fatal else None) if not watch else None
        for item in drain(loop.events, 0.01):
            if loop.handle_common(item) and isinstance(item, ev.EvalResult):
                loop.write_result(item)
        loop.decisions.finish(early_stop=None)
        loop.close()
    if loop.fatal:
        raise UserError(loop.fatal)
    return 0


def _report_unusable(loop: _Loop, folder: Path, files: list[Path], done: set[str], watch: bool) -> None:
    """Files eval-dir cannot evaluate: a row for broken .safetensors, a message for pickle formats."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".ckpt", ".pt", ".pth", ".bin"))
    if pickles:
        loop.view.message(f"not evaluated (only safetensors are loaded, never pickle): {', '.join(pickles)}; "
                          "save with --save_model_as safetensors")
    complete = {p.name for p in files}
    for path in sorted(folder.iterdir()):
        if not is_candidate(path) or path.name in complete or path.name in done or watch:
            continue
        reason = why_incomplete(path)
        if reason:
            loop.write_result(ev.EvalResult(path, step_from_name(path)[0], error=reason))


def _check_folder(folder: Path, watch: bool) -> None:
    """Refuse, before anything is written, a folder eval-dir has nothing to do in."""
    if watch or any(is_candidate(p) for p in folder.iterdir()):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".ckpt", ".pt", ".pth", ".bin"))
    if pickles:
        raise UserError(f"{folder}: only pickle checkpoints ({pickles[0]}, ...); only .safetensors LoRA files are "
                        "evaluated - retrain or convert with --save_model_as safetensors")
    raise UserError(f"{folder}: no LoRA .safetensors files; give the folder kohya saves into (output_dir)")


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
