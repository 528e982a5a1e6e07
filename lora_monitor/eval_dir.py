"""`lora-monitor eval-dir`: evaluate the LoRA files already in a folder, in step order; `--watch` for new ones.

Checkpoints already in the CSV are skipped, so it completes a run that crashed or was stopped. Under
`accelerate launch --num_processes N` or torchrun, the processes share the work through the launcher's own
process group (`eval_dir_processes.py`); alone, one worker thread evaluates while this thread writes rows.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path

from lora_monitor import events as ev
from lora_monitor.checkpoints.files import checkpoint_order, read_header, ready_of, step_from_name, why_incomplete
from lora_monitor.checkpoints.watcher import CheckpointWatcher, is_candidate, list_checkpoints
from lora_monitor.columns import BASELINE
from lora_monitor.config import Config
from lora_monitor.errors import UserError
from lora_monitor.evaluation.inputs import Inputs, check_inputs
from lora_monitor.evaluation.kohya_samples import (
    SampleWatcher,
    build_sample_models,
    check_sample_folder,
    check_sample_inputs,
    eval_dir_samples,
    uses_samples,
)
from lora_monitor.evaluation.worker import EvalWorker, build_models, drain
from lora_monitor.kohya.tensorboard import StepFacts, read_run, run_for_session
from lora_monitor.lock import OutputLock
from lora_monitor.run_spec import RunSpec, eval_dir_spec
from lora_monitor.run_state import RunState, SignalCatcher
from lora_monitor.tracking.live import LiveView
from lora_monitor.tracking.rows import TrainingValues

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
WORKER_EXIT_WAIT_S = 300.0  # at exit, for the evaluation in progress (and a model load) to end


def _check_folder(folder: Path, watch: bool) -> None:
    """Refuse, before anything is written, a folder eval-dir has nothing to do in."""
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; give the kohya output folder to eval-dir")
    if watch or any(is_candidate(p) for p in folder.iterdir()):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{folder}: only pickle checkpoints ({pickles[0]}, ...); only .safetensors LoRA files are "
                        "evaluated - retrain or convert with --save_model_as safetensors")
    raise UserError(f"{folder}: no LoRA .safetensors files; give the folder kohya saves into (output_dir)")


def _report_unusable(loop: RunState, folder: Path, files: list[Path], done: set[str]) -> None:
    """Files that cannot be evaluated: a row for a broken .safetensors file, a message for pickle formats."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        loop.view.message(f"not evaluated (only safetensors are loaded, never pickle): {', '.join(pickles)}; "
                          "save with --save_model_as safetensors")
    complete = {p.name for p in files}
    broken = [p for p in sorted(folder.iterdir()) if is_candidate(p) and p.name not in complete | done]
    for path in broken:
        reason = why_incomplete(path)
        if reason:
            loop.write_result(ev.EvalResult(path, step_from_name(path)[0], error=reason), TrainingValues())


class SessionLogs:
    """kohya's TensorBoard values for files already on disk, from the run that wrote them.

    Each file names its training session (`ss_training_started_at`); only the log run of that session is
    read (`run_for_session`), so files of another run never get this folder's losses. Files without that
    metadata, or whose run's logs are gone, get empty loss and learning-rate cells.
    """

    def __init__(self, spec: RunSpec) -> None:
        self.logging_dir = spec.logging_dir
        self._by_start: dict[float | None, StepFacts | None] = {}

    def of(self, checkpoint: Path) -> StepFacts | None:
        started = _started_at(checkpoint)
        if started not in self._by_start:
            run = run_for_session(self.logging_dir, started) if self.logging_dir else None
            self._by_start[started] = read_run(run) if run is not None else None
        return self._by_start[started]


def _started_at(checkpoint: Path) -> float | None:
    try:
        return float(read_header(checkpoint).metadata["ss_training_started_at"])
    except (OSError, ValueError, KeyError):
        return None


def run_eval_dir(config: Config, folder: Path, csv_path: Path | None, watch: bool, view: LiveView) -> int:
    folder = folder.resolve()
    if uses_samples(config):
        check_sample_folder(folder, watch)
    else:
        _check_folder(folder, watch)
    spec = eval_dir_spec(config, folder, csv_path)
    inputs = check_sample_inputs(spec) if uses_samples(config) else check_inputs(spec)
    if launched_processes() > 1 and uses_samples(config):
        raise UserError("eval.source = 'kohya_samples': run eval-dir as one process (scoring kohya's images needs "
                        "no second GPU)")
    if launched_processes() > 1:
        from lora_monitor.eval_dir_processes import run_across_processes

        return run_across_processes(spec, watch, view, inputs)
    with OutputLock(folder):
        return _evaluate(spec, watch, view, inputs)


def launched_processes(env: Mapping[str, str] | None = None) -> int:
    """How many processes `accelerate launch`/torchrun started for this command (1 when run alone)."""
    env = os.environ if env is None else env
    try:
        return max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def plan(loop: RunState, folder: Path) -> tuple[list[Path], list[ev.CheckpointReady]]:
    """The folder's LoRA files in step order, and those to evaluate: not in the CSV yet, and on the schedule.
    Broken files get their row here."""
    done = loop.tracker.done()
    output_name = loop.spec.output_name
    files = sorted(list_checkpoints(folder), key=lambda p: checkpoint_order(p, output_name))
    _report_unusable(loop, folder, files, done)
    schedule = loop.spec.schedule()
    todo = [ready_of(p, output_name) for p in files if p.name not in done]
    todo = [r for r in todo if schedule.should_eval(r.step, r.is_final)]
    loop.view.message(f"{len(files)} LoRA files in {folder}; {len(todo)} to evaluate, "
                      f"{sum(p.name in done for p in files)} already in {loop.spec.csv_path.name}")
    return files, todo


def scheduled(loop: RunState, item: ev.FileComplete) -> ev.CheckpointReady | None:
    """A file that appeared under --watch: the same schedule as the files found at start."""
    ready = ready_of(item.path, loop.spec.output_name)
    return ready if loop.spec.schedule().should_eval(ready.step, ready.is_final) else None


def watch_folder(loop: RunState, files: list[Path]) -> CheckpointWatcher:
    watcher = CheckpointWatcher(loop.spec.output_dir, lambda p: loop.events.put(ev.FileComplete(p)),
                                lambda p: loop.events.put(ev.FileDeleted(p)), ignore={p.name for p in files})
    watcher.start()
    loop.view.message("watching for new checkpoints; Ctrl-C to stop")
    return watcher


def _evaluate(spec: RunSpec, watch: bool, view: LiveView, inputs: Inputs) -> int:
    loop = RunState(spec, view)
    if uses_samples(spec.config):
        return _evaluate_samples(loop, watch, inputs)
    worker = EvalWorker(lambda: build_models(spec, inputs), loop.events.put, newest_first=False,
                        baseline=BASELINE not in loop.tracker.done())
    files, todo = plan(loop, spec.output_dir)
    logs = SessionLogs(spec)
    worker.start()
    for ready in todo:
        worker.submit(ready)
    watcher = watch_folder(loop, files) if watch else None
    return _run(loop, worker, logs, len(todo), watch, watcher)


def _evaluate_samples(loop: RunState, watch: bool, inputs: Inputs) -> int:
    """[eval] source = "kohya_samples": kohya's images in sample/ are scored; no diffusion model is loaded."""
    spec = loop.spec
    worker = EvalWorker(lambda: build_sample_models(spec, inputs), loop.events.put, newest_first=False)
    expected, watcher = eval_dir_samples(spec, worker, len(inputs.prompts), loop.tracker.done(), loop.view.message)
    worker.start()
    if watch:
        watcher.start()
        loop.view.message("watching for new kohya samples; Ctrl-C to stop")
    return _run(loop, worker, SampleLogs(spec), expected, watch, watcher if watch else None)


class SampleLogs(SessionLogs):
    """A sampling kohya saved no LoRA at (`sample@step N`) reads the logs of the folder's newest LoRA's session."""

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self.folder = spec.output_dir

    def of(self, checkpoint: Path) -> StepFacts | None:
        if not checkpoint.exists():
            files = list_checkpoints(self.folder)
            if not files:
                return None
            checkpoint = max(files, key=lambda p: p.stat().st_mtime)
        return super().of(checkpoint)


def _run(loop: RunState, worker: EvalWorker, logs: SessionLogs, expected: int, watch: bool,
         watcher: CheckpointWatcher | SampleWatcher | None) -> int:
    # Handlers of our own: a SIGINT inherited as ignored (nohup, `cmd &` in a script) must still stop --watch.
    with SignalCatcher() as caught:
        try:
            _follow(loop, worker, logs, expected, watch, caught)
        finally:
            if watcher:
                watcher.stop()
            # Let the worker finish the checkpoint in hand (the rest is left for the next eval-dir): a thread
            # still inside torch when the interpreter exits can abort the process (SIGABRT).
            worker.close(timeout=WORKER_EXIT_WAIT_S, backfill=False)
    return finish(loop, caught.signum, watch)


def finish(loop: RunState, signum: int | None, watch: bool) -> int:
    """Publish best.json and the report; the exit code."""
    if signum is not None:
        loop.view.message(f"stopped ({signal.Signals(signum).name}); rows written so far are kept")
    loop.decisions.finish(early_stop=None)
    loop.close()
    if loop.fatal:
        raise UserError(loop.fatal)
    if loop.unwritten:
        loop.view.message(f"{len(loop.unwritten)} rows could not be written: {', '.join(loop.unwritten)}")
        return 1
    # --watch runs until it is stopped: that is its normal end
    return 0 if signum is None or watch else 128 + signum


def _follow(loop: RunState, worker: EvalWorker, logs: SessionLogs, expected: int, watch: bool,
            caught: SignalCatcher) -> None:
    """Write rows as results arrive, until every queued file has one (with --watch: until a signal)."""
    while (watch or expected > 0) and caught.signum is None:
        for item in drain(loop.events, 0.5):
            if isinstance(item, ev.FileComplete):
                if (ready := scheduled(loop, item)) is not None:
                    worker.submit(ready)
            else:
                loop.handle_common(item, time.monotonic())
        for _, result in loop.waiting:
            loop.write_result(result, loop.values_at(result.step, logs.of(result.checkpoint)))
            expected -= 0 if result.baseline else 1
        loop.waiting.clear()
        loop.view.set_queue([r.path.name for r in worker.pending()],
                            worker.busy_with.name if worker.busy_with else None)
        loop.view.refresh()
        if loop.fatal and not watch:
            return
