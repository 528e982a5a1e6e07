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
from pathlib import Path

from lora_monitor import events as ev
from lora_monitor.config import Config
from lora_monitor.errors import UserError
from lora_monitor.live import LiveView
from lora_monitor.lock import OutputLock
from lora_monitor.lora_files import step_from_name, why_incomplete
from lora_monitor.pipeline import EvalWorker, Inputs, build_models, check_inputs, drain
from lora_monitor.runner import _Loop, _SignalCatcher, _sort_key, ready_of, schedule_of
from lora_monitor.tracker import COLUMNS, Tracker
from lora_monitor.watcher import CheckpointWatcher, is_candidate, list_checkpoints

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
PEER_WAIT_S = 3600.0  # how long process 0 waits for the other processes before writing the report


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


def _report_unusable(loop: _Loop, folder: Path, files: list[Path], done: set[str], slot: Slot) -> None:
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
            loop.write_result(ev.EvalResult(path, step_from_name(path)[0], error=reason))


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


def _peer_marker(folder: Path, rank: int) -> Path:
    return folder / f".lora-monitor.rank{rank}.done"


def run_eval_dir(config: Config, folder: Path, csv_path: Path | None, watch: bool, view: LiveView) -> int:
    folder = folder.resolve()
    _check_folder(folder, watch)
    csv_path = csv_path or config.csv_path(folder) or folder / "loss_tracker.csv"
    inputs = check_inputs(config)
    if config.output.tensorboard:
        from lora_monitor.tb_writer import check_available

        check_available()
    slot = process_slot()
    if slot.world > 1:
        config = _per_process_device(config, slot)
        view.message(f"process {slot.rank} of {slot.world}: evaluates files {slot.rank}, {slot.rank + slot.world}, "
                     "... of the folder's sorted list")
    if not slot.primary:
        _wait_for_header(csv_path)
        return _evaluate(config, folder, csv_path, watch, view, inputs, slot)
    for rank in range(1, slot.world):
        _peer_marker(folder, rank).unlink(missing_ok=True)
    with OutputLock(folder):
        return _evaluate(config, folder, csv_path, watch, view, inputs, slot)


def _per_process_device(config: Config, slot: Slot) -> Config:
    """One GPU per process (accelerate's LOCAL_RANK), unless the config names a device."""
    import torch

    if config.eval.device != "auto" or not torch.cuda.is_available():
        return config
    local = int(os.environ.get("LOCAL_RANK", slot.rank)) % torch.cuda.device_count()
    return dataclasses.replace(config, eval=dataclasses.replace(config.eval, device=f"cuda:{local}"))


def _evaluate(config: Config, folder: Path, csv_path: Path, watch: bool, view: LiveView, inputs: Inputs,
              slot: Slot) -> int:
    loop = _Loop(config, folder, csv_path, view, primary=slot.primary)
    output_name = config.output_name if config.kohya else None
    done = loop.tracker.done()
    sdxl = config.kohya.sdxl if config.kohya else False
    worker = EvalWorker(lambda: build_models(config, folder, inputs, sdxl), loop.events.put, newest_first=False)
    files = sorted(list_checkpoints(folder), key=lambda p: _sort_key(p, output_name))
    _report_unusable(loop, folder, files, done, slot)
    schedule = schedule_of(config)
    todo = [ready_of(p, output_name) for i, p in enumerate(files) if slot.mine(i) and p.name not in done]
    todo = [r for r in todo if schedule.should_eval(r.step, r.is_final)]
    view.message(f"{len(files)} LoRA files in {folder}; {len(todo)} to evaluate here, "
                 f"{sum(p.name in done for p in files)} already in {csv_path.name}")
    loop.facts = loop.decisions.facts_from_logs()
    worker.start()
    for ready in todo:
        worker.submit(ready)
    watcher = None
    if watch:
        watcher = CheckpointWatcher(folder, lambda p: worker.submit(ready_of(p, output_name)),
                                    lambda p: loop.events.put(("removed", p)), ignore={p.name for p in files})
        watcher.start()
        view.message("watching for new checkpoints; Ctrl-C to stop")
    # Handlers of our own: a SIGINT inherited as ignored (nohup, `cmd &` in a script) must still stop --watch.
    with _SignalCatcher() as caught:
        try:
            _follow(loop, worker, len(todo), watch, caught)
        finally:
            if watcher:
                watcher.stop()
    if caught.signum is not None:
        view.message(f"stopped ({signal.Signals(caught.signum).name}); rows written so far are kept")
    _finish(loop, folder, csv_path, slot)
    if loop.fatal:
        raise UserError(loop.fatal)
    # --watch runs until it is stopped: that is its normal end
    return 0 if caught.signum is None or watch else 128 + caught.signum


def _follow(loop: _Loop, worker: EvalWorker, expected: int, watch: bool, caught: _SignalCatcher) -> None:
    """Write rows as results arrive, until every queued file has one (with --watch: until a signal)."""
    while (watch or expected > 0) and caught.signum is None:
        for item in drain(loop.events, 0.5):
            loop.handle_common(item)
        for _, result in loop.waiting:
            loop.write_result(result)
            expected -= 1
        loop.waiting.clear()
        loop.view.set_queue([r.path.name for r in worker.pending()],
                            worker.busy_with.name if worker.busy_with else None)
        loop.view.refresh()
        if loop.fatal and not watch:
            return


def _finish(loop: _Loop, folder: Path, csv_path: Path, slot: Slot) -> None:
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
            loop.decisions.after_row(last, folder / last["checkpoint"])
    loop.decisions.finish(early_stop=None)
    loop.close()
