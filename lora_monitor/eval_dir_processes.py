"""`eval-dir` across the processes that `accelerate launch` or torchrun started, on one machine or several.

The processes coordinate through the launcher's own process group (accelerate's `PartialState`: NCCL on
GPUs, gloo on CPUs), not through files: only the main process lists the folder, holds its lock, reads kohya's
logs and writes the CSV, best.json and the report. It works in rounds: it hands each process one checkpoint
(`broadcast_object_list`), every process evaluates its own on its own device, and the results come back to it
(`gather_object`), which writes their rows at once. So no shared disk is needed for the CSV; each process
needs only to read the LoRA files at the same path (a shared or copied folder) and writes the images of the
checkpoints it evaluated into its own `eval/` folder.

A signal to any process ends all of them after the round in hand; a process that cannot load the models
stops all of them before any work is handed out.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from lora_monitor import events as ev
from lora_monitor.columns import BASELINE
from lora_monitor.errors import UserError
from lora_monitor.eval_dir import SessionLogs, finish, plan, scheduled, watch_folder
from lora_monitor.evaluation.inputs import Inputs
from lora_monitor.evaluation.worker import Models, build_models, drain, evaluate_baseline, evaluate_one
from lora_monitor.lock import OutputLock
from lora_monitor.run_spec import RunSpec
from lora_monitor.run_state import RunState, SignalCatcher
from lora_monitor.tracking.live import LiveView
from lora_monitor.tracking.rows import TrainingValues

IDLE_POLL_S = 1.0  # --watch with nothing to do: how long the main process waits for new files per round


@dataclasses.dataclass(frozen=True)
class Round:
    """What the main process sends each round: one checkpoint per process (fewer at the end)."""

    batch: tuple[ev.CheckpointReady, ...] = ()
    last: bool = False  # no more rounds: every process leaves
    error: str | None = None  # the main process failed before the work started


@dataclasses.dataclass(frozen=True)
class Report:
    """What each process sends back each round."""

    result: ev.EvalResult | None = None
    wants_stop: bool = False  # it caught SIGINT/SIGTERM
    error: str | None = None  # it could not load its models


def run_across_processes(spec: RunSpec, watch: bool, view: LiveView, inputs: Inputs) -> int:
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=spec.config.eval.device == "cpu" or not torch.cuda.is_available())
    spec = _on_own_device(spec, "cpu" if state.device.type == "cpu" else str(state.device))
    if not state.is_main_process:
        view.message(f"process {state.process_index} of {state.num_processes} on {state.device}")
        return _peer(spec, inputs, state)
    view.message(f"{state.num_processes} processes ({state.backend}); main on {state.device}")
    try:
        lock = OutputLock(spec.output_dir)
        lock.acquire()
    except UserError as exc:
        _send(state, Round(last=True, error=str(exc)))
        raise
    try:
        return _main(spec, watch, view, inputs, state)
    finally:
        lock.release()


def _on_own_device(spec: RunSpec, device: str) -> RunSpec:
    """One device per process (the launcher's local rank), unless the config names one."""
    eval_cfg = spec.config.eval
    if eval_cfg.device != "auto":
        return spec
    config = dataclasses.replace(spec.config, eval=dataclasses.replace(eval_cfg, device=device))
    return dataclasses.replace(spec, config=config)


def _send(state: Any, message: Round | None) -> Round:
    from accelerate.utils import broadcast_object_list

    box = [message]
    broadcast_object_list(box, from_process=0)
    assert isinstance(box[0], Round)
    return box[0]


def _gather(report: Report) -> list[Report]:
    from accelerate.utils import gather_object

    return list(gather_object([report]))


def _load(spec: RunSpec, inputs: Inputs) -> tuple[Models | None, str | None]:
    try:
        return build_models(spec, inputs), None
    except UserError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - every process must reach the next collective call, or all hang
        return None, f"{type(exc).__name__}: {exc}"


def _evaluate_share(models: Models, message: Round, rank: int, fingerprints: dict, caught: SignalCatcher) -> Report:
    ready = message.batch[rank] if rank < len(message.batch) else None
    result = evaluate_one(models, ready, fingerprints) if ready is not None else None
    return Report(result=result, wants_stop=caught.signum is not None)


def _peer(spec: RunSpec, inputs: Inputs, state: Any) -> int:
    models, error = _load(spec, inputs)
    fingerprints: dict[str, tuple[str, dict]] = {}
    with SignalCatcher() as caught:
        message = _send(state, None)
        if message.error is not None:
            return 1  # the main process says why
        _gather(Report(error=error))
        while True:
            message = _send(state, None)
            if message.last or models is None:
                return 0 if message.error is None else 1
            if any(r.wants_stop for r in _gather(_evaluate_share(models, message, state.process_index,
                                                                 fingerprints, caught))):
                return 0


def _main(spec: RunSpec, watch: bool, view: LiveView, inputs: Inputs, state: Any) -> int:
    loop = RunState(spec, view)
    files, todo = plan(loop, spec.output_dir)
    models, error = _load(spec, inputs)
    _send(state, Round())  # the lock is held: start
    errors = [(i, r.error) for i, r in enumerate(_gather(Report(error=error))) if r.error]
    if errors:
        _send(state, Round(last=True, error="models not loaded"))
        loop.close()
        raise UserError("; ".join(f"process {i}: {e}" for i, e in errors))
    assert models is not None
    for warning in models.warnings:
        view.message(f"warning: {warning}")
    logs = SessionLogs(spec)
    if BASELINE not in loop.tracker.done():
        loop.write_result(evaluate_baseline(models), TrainingValues())  # the others wait for their first round
    watcher = watch_folder(loop, files) if watch else None
    by_process: Counter[int] = Counter()
    fingerprints: dict[str, tuple[str, dict]] = {}
    with SignalCatcher() as caught:
        try:
            while True:
                todo += _new_files(loop, watch and not todo)
                batch, todo = tuple(todo[: state.num_processes]), todo[state.num_processes:]
                message = Round(batch=batch, last=not batch and not watch)
                _send(state, message)
                if message.last:
                    break
                reports = _gather(_evaluate_share(models, message, 0, fingerprints, caught))
                _write(loop, logs, reports, by_process)
                if any(r.wants_stop for r in reports):
                    caught.signum = caught.signum or signal.SIGINT  # another process was stopped
                    break
        finally:
            if watcher is not None:
                watcher.stop()
    view.message("evaluated per process: " + ", ".join(f"{i}: {by_process[i]}" for i in range(state.num_processes)))
    return finish(loop, caught.signum, watch)


def _new_files(loop: RunState, idle: bool) -> list[ev.CheckpointReady]:
    """Files the watcher handed over since the last round (waiting a little when there is nothing to do)."""
    out = []
    for item in drain(loop.events, IDLE_POLL_S if idle else 0.0):
        if isinstance(item, ev.FileComplete):
            if (ready := scheduled(loop, item)) is not None:
                out.append(ready)
        else:
            loop.handle_common(item, time.monotonic())
    return out


def _write(loop: RunState, logs: SessionLogs, reports: list[Report], by_process: Counter[int]) -> None:
    for index, report in enumerate(reports):
        result = report.result
        if result is None:
            continue
        by_process[index] += 1
        loop.write_result(result, loop.values_at(result.step, logs.of(Path(result.checkpoint))))
    loop.view.refresh()
