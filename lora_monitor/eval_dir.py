"""`lora-monitor eval-dir`: evaluate the LoRA files already in a folder, in step order; `--watch` for new ones.

Checkpoints already in the CSV are skipped, so it completes a run that crashed or was stopped. Under
`accelerate launch --num_processes N` (or torchrun) each process takes every N-th file of the folder's sorted
list, on its own GPU, and all append to one CSV (whole rows with O_APPEND, so rows never interleave);
process 0 holds the folder's lock, then publishes best.json and the report once the others are done.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import zlib
from pathlib import Path

from lora_monitor import events as ev
from lora_monitor.checkpoints.files import checkpoint_order, read_header, ready_of, step_from_name, why_incomplete
from lora_monitor.checkpoints.watcher import CheckpointWatcher, is_candidate, list_checkpoints
from lora_monitor.columns import COLUMNS
from lora_monitor.config import Config
from lora_monitor.errors import UserError
from lora_monitor.evaluation.inputs import Inputs, check_inputs
from lora_monitor.evaluation.worker import EvalWorker, build_models, drain
from lora_monitor.kohya.tensorboard import StepFacts, read_run, run_for_session
from lora_monitor.lock import OutputLock
from lora_monitor.run_spec import RunSpec, eval_dir_spec
from lora_monitor.run_state import RunState, SignalCatcher
from lora_monitor.tracking.live import LiveView
from lora_monitor.tracking.rows import TrainingValues
from lora_monitor.tracking.tracker import Tracker

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PEER_WAIT_S = 3600.0  # how long process 0 waits for the other processes before writing the report
WORKER_EXIT_WAIT_S = 300.0  # at exit, for the evaluation in progress (and a model load) to end


@dataclasses.dataclass(frozen=True)
class Slot:
    """This process's place among the processes `accelerate launch`/torchrun started (rank 0 of 1 alone)."""

    rank: int = 0
    world: int = 1

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def owns(self, name: str) -> bool:
        """A file that appears later (--watch): a split by name that every process computes alike."""
        return zlib.crc32(name.encode("utf-8")) % self.world == self.rank


def process_slot(env: dict[str, str] | None = None) -> Slot:
    env = dict(os.environ) if env is None else env
    try:
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return Slot()
    return Slot(rank, world) if 0 <= rank < world else Slot()


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


def _report_unusable(loop: RunState, folder: Path, files: list[Path], done: set[str], slot: Slot) -> None:
    """Files that cannot be evaluated: a row for a broken .safetensors file, a message for pickle formats."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and slot.primary:
        loop.view.message(f"not evaluated (only safetensors are loaded, never pickle): {', '.join(pickles)}; "
                          "save with --save_model_as safetensors")
    complete = {p.name for p in files}
    broken = [p for p in sorted(folder.iterdir()) if is_candidate(p) and p.name not in complete | done]
    for index, path in enumerate(broken):
        reason = why_incomplete(path)
        if reason and slot.mine(index):
            loop.write_result(ev.EvalResult(path, step_from_name(path)[0], error=reason), TrainingValues())


def _wait_for_header(csv_path: Path, timeout: float = 300.0) -> None:
    """Processes other than 0 start once process 0 has created the CSV (so only one writes its header)."""
    header = ",".join(COLUMNS)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if csv_path.read_text(encoding="utf-8").startswith(header + "\n"):
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise UserError(f"{csv_path}: process 0 did not create the CSV within {timeout:.0f} s; is it running?")


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


def _peer_marker(folder: Path, rank: int) -> Path:
    return folder / f".lora-monitor.rank{rank}.done"


def run_eval_dir(config: Config, folder: Path, csv_path: Path | None, watch: bool, view: LiveView) -> int:
    folder = folder.resolve()
    _check_folder(folder, watch)
    spec = eval_dir_spec(config, folder, csv_path)
    csv_path = spec.csv_path
    inputs = check_inputs(spec)
    slot = process_slot()
    if slot.world > 1:
        spec = dataclasses.replace(spec, config=_per_process_device(config, slot))
        view.message(f"process {slot.rank} of {slot.world}: evaluates files {slot.rank}, {slot.rank + slot.world}, "
                     "... of the folder's sorted list")
    if not slot.primary:
        _wait_for_header(csv_path)
        return _evaluate(spec, watch, view, inputs, slot)
    for rank in range(1, slot.world):
        _peer_marker(folder, rank).unlink(missing_ok=True)
    with OutputLock(folder):
        return _evaluate(spec, watch, view, inputs, slot)


def _per_process_device(config: Config, slot: Slot) -> Config:
    """One GPU per process (accelerate's LOCAL_RANK), unless the config names a device."""
    import torch

    if config.eval.device != "auto" or not torch.cuda.is_available():
        return config
    local = int(os.environ.get("LOCAL_RANK", slot.rank)) % torch.cuda.device_count()
    return dataclasses.replace(config, eval=dataclasses.replace(config.eval, device=f"cuda:{local}"))


def _evaluate(spec: RunSpec, watch: bool, view: LiveView, inputs: Inputs, slot: Slot) -> int:
    folder, csv_path = spec.output_dir, spec.csv_path
    loop = RunState(spec, view, primary=slot.primary)
    output_name = spec.output_name
    done = loop.tracker.done()
    worker = EvalWorker(lambda: build_models(spec, inputs), loop.events.put, newest_first=False)
    files = sorted(list_checkpoints(folder), key=lambda p: checkpoint_order(p, output_name))
    _report_unusable(loop, folder, files, done, slot)
    schedule = spec.schedule()
    todo = [ready_of(p, output_name) for i, p in enumerate(files) if slot.mine(i) and p.name not in done]
    todo = [r for r in todo if schedule.should_eval(r.step, r.is_final)]
    view.message(f"{len(files)} LoRA files in {folder}; {len(todo)} to evaluate here, "
                 f"{sum(p.name in done for p in files)} already in {csv_path.name}")
    logs = SessionLogs(spec)
    worker.start()
    for ready in todo:
        worker.submit(ready)
    watcher = None
    if watch:
        watcher = CheckpointWatcher(folder, lambda p: loop.events.put(ev.FileComplete(p)),
                                    lambda p: loop.events.put(ev.FileDeleted(p)), ignore={p.name for p in files})
        watcher.start()
        view.message("watching for new checkpoints; Ctrl-C to stop")
    # Handlers of our own: a SIGINT inherited as ignored (nohup, `cmd &` in a script) must still stop --watch.
    with SignalCatcher() as caught:
        try:
            _follow(loop, worker, logs, len(todo), watch, caught, slot)
        finally:
            if watcher:
                watcher.stop()
            # Let the worker finish the checkpoint in hand (the rest is left for the next eval-dir): a thread
            # still inside torch when the interpreter exits can abort the process (SIGABRT).
            worker.close(timeout=WORKER_EXIT_WAIT_S, backfill=False)
    if caught.signum is not None:
        view.message(f"stopped ({signal.Signals(caught.signum).name}); rows written so far are kept")
    _finish(loop, folder, csv_path, slot)
    if loop.fatal:
        raise UserError(loop.fatal)
    # --watch runs until it is stopped: that is its normal end
    return 0 if caught.signum is None or watch else 128 + caught.signum


def _follow(loop: RunState, worker: EvalWorker, logs: SessionLogs, expected: int, watch: bool,
            caught: SignalCatcher, slot: Slot) -> None:
    """Write rows as results arrive, until every queued file has one (with --watch: until a signal)."""
    schedule = loop.spec.schedule()
    while (watch or expected > 0) and caught.signum is None:
        for item in drain(loop.events, 0.5):
            if isinstance(item, ev.FileComplete):
                # a new file under --watch: the same schedule, queue and split as the files found at start
                ready = ready_of(item.path, loop.spec.output_name)
                if slot.owns(item.path.name) and schedule.should_eval(ready.step, ready.is_final):
                    worker.submit(ready)
            else:
                loop.handle_common(item, time.monotonic())
        for _, result in loop.waiting:
            loop.write_result(result, loop.values_at(result.step, logs.of(result.checkpoint)))
            expected -= 1
        loop.waiting.clear()
        loop.view.set_queue([r.path.name for r in worker.pending()],
                            worker.busy_with.name if worker.busy_with else None)
        loop.view.refresh()
        if loop.fatal and not watch:
            return


def _finish(loop: RunState, folder: Path, csv_path: Path, slot: Slot) -> None:
    if not slot.primary:
        _peer_marker(folder, slot.rank).write_text(str(os.getpid()))
        loop.close()
        return
    if slot.world > 1:
        end = time.monotonic() + PEER_WAIT_S
        while time.monotonic() < end and not all(_peer_marker(folder, r).exists() for r in range(1, slot.world)):
            time.sleep(0.5)
        for rank in range(1, slot.world):
            _peer_marker(folder, rank).unlink(missing_ok=True)
        loop.tracker = loop.decisions.tracker = Tracker(csv_path)  # every process's rows, for best and report
        if loop.tracker.rows:
            last = loop.tracker.rows[-1]
            loop.decisions.after_row(last)
    loop.decisions.finish(early_stop=None)
    loop.close()
