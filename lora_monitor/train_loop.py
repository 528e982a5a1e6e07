"""`lora-monitor train`: launch kohya, follow it, evaluate each checkpoint as it appears.

Exit code: kohya's own; 0 after an early stop; 130/143 when the monitor itself got SIGINT/SIGTERM.

A finished evaluation becomes a row once kohya's values for its step are in: kohya saves a checkpoint
inside a step and only then logs that step's scalars (loss, learning rate) to TensorBoard, so a row waits
(at most SETTLE_WAIT_S) until the logs reach its step, or kohya exits.
"""

from __future__ import annotations

import os
import re
import signal
import time

from lora_monitor import events as ev
from lora_monitor.checkpoints.files import ready_of
from lora_monitor.checkpoints.watcher import CheckpointWatcher, list_checkpoints
from lora_monitor.columns import BASELINE
from lora_monitor.config import Config
from lora_monitor.cpu_share import CpuShare, kohya_env, plan, usable_cores
from lora_monitor.evaluation.inputs import check_inputs
from lora_monitor.evaluation.kohya_samples import (
    build_sample_models,
    check_sample_inputs,
    device_name,
    sample_watcher,
    settle_name,
    uses_samples,
)
from lora_monitor.evaluation.worker import EvalWorker, build_models, drain
from lora_monitor.finish_evals import finish_evaluations
from lora_monitor.kohya.args import build_argv
from lora_monitor.kohya.console_log import CONSOLE_LOG_NAME
from lora_monitor.kohya.preflight import preflight
from lora_monitor.kohya.process import KohyaProcess
from lora_monitor.kohya.tensorboard import LogFollower
from lora_monitor.lock import OutputLock
from lora_monitor.policies.eval_schedule import EvalSchedule, EveryCheckpoint
from lora_monitor.run_spec import RunSpec, train_spec
from lora_monitor.run_state import RunState, SignalCatcher
from lora_monitor.tracking.live import LiveView

SETTLE_WAIT_S = 60.0  # longest a finished evaluation waits for kohya's values of its step
# kohya's own packages missing from the interpreter that runs it (lora-monitor's, unless [kohya] python is set)
MISSING_MODULE_RE = re.compile(r"\bModuleNotFoundError: No module named '(?P<name>[^']+)'")


class TrainRun:
    """One launch of kohya and what follows it: the process, the watcher, the worker and the rows."""

    def __init__(self, spec: RunSpec, view: LiveView, caught: SignalCatcher, share: CpuShare | None = None) -> None:
        assert spec.kohya is not None
        self.spec = spec
        self.state = RunState(spec, view)
        self.view = view
        self.caught = caught
        self.schedule: EvalSchedule | EveryCheckpoint = spec.schedule()
        self.redraws: dict[int, int] = {}  # how often kohya drew each step (the loss is final on the 2nd)
        self.current_step = 0
        self.logs: LogFollower | None = None
        self.share = share or CpuShare()
        self.shown_warnings: set[str] = set()  # kohya repeats some warnings at every save: shown once
        self.proc = KohyaProcess(build_argv(spec.kohya), cwd=spec.kohya.sd_scripts, on_event=self.state.events.put,
                                 env=kohya_env(self.share), log_path=spec.output_dir / CONSOLE_LOG_NAME)
        self.worker: EvalWorker | None = None

    # -- events ------------------------------------------------------------------------------------------

    def handle(self, item: object) -> None:
        view = self.view
        if isinstance(item, ev.TrainProgress):
            self.redraws[item.step] = self.redraws.get(item.step, 0) + 1
            self.current_step = max(self.current_step, item.step)
            loss_step = self.state.note_progress(item)
            view.progress(item.step, item.total, item.loss, item.rate, loss_step)
        elif isinstance(item, ev.EpochStarted):
            view.set_epoch(item.epoch, item.total)
        elif isinstance(item, ev.CheckpointSaving):
            view.message(f"kohya is saving {item.path.name}")
        elif isinstance(item, ev.CheckpointRemoved):
            view.message(f"kohya removed {item.path.name}")
        elif isinstance(item, ev.TrainerLog):
            self.trainer_log(item)
        elif isinstance(item, ev.FileComplete):
            ready = ready_of(item.path, self.spec.output_name)
            if self.worker is not None and self.schedule.should_eval(ready.step, ready.is_final):
                self.worker.submit(ready)
        else:
            self.state.handle_common(item, time.monotonic())

    def trainer_log(self, item: ev.TrainerLog) -> None:
        """kohya's errors, and each distinct warning once (all of it, repeats included, is in kohya.log)."""
        if item.stream == "monitor":  # about kohya.log itself
            self.view.message(f"warning: {item.text}")
        elif item.level == "error":
            self.view.message(f"kohya: {item.text}")
        elif item.level == "warning" and item.text not in self.shown_warnings:
            self.shown_warnings.add(item.text)
            self.view.message(f"kohya: warning: {item.text}")

    def pump(self, timeout: float) -> list[object]:
        """Handle what arrived (waiting up to `timeout`), read kohya's new log values, write settled rows."""
        items = drain(self.state.events, timeout)
        exits = [i for i in items if isinstance(i, ev.TrainerExited)]
        for item in items:
            if not isinstance(item, ev.TrainerExited):
                self.handle(item)
        if self.logs is not None:
            self.logs.poll()
        self.write_settled()
        if self.worker is not None:
            self.view.set_queue([r.path.name for r in self.worker.pending()],
                                self.worker.busy_with.name if self.worker.busy_with else None)
        self.view.refresh()
        return exits

    # -- rows --------------------------------------------------------------------------------------------

    def settled(self, step: int | None, waited: float) -> bool:
        """Are kohya's values for `step` in? With TensorBoard logs: once they reach the step. Without: once
        kohya redrew the step with its final avr_loss (it draws a step again after saving)."""
        if step is None or self.proc.returncode is not None or waited > SETTLE_WAIT_S:
            return True
        if self.logged():
            return (self.logs.facts.last_step or 0) >= step  # type: ignore[union-attr]
        return self.current_step > step or self.redraws.get(step, 0) >= 2

    def logged(self) -> bool:
        """Does kohya write a TensorBoard run? It creates it before its first step, so by the first save
        a run that is not there will not come (a trainer without TensorBoard: its printed loss is used)."""
        return self.logs is not None and self.logs.run is not None

    def write_settled(self) -> None:
        now = time.monotonic()
        keep = []
        facts = self.logs.facts if self.logged() else None  # type: ignore[union-attr]
        for arrived, result in self.state.waiting:
            if self.settled(result.step, now - arrived):
                result = settle_name(result, self.spec.output_dir, self.spec.output_name)
                self.state.write_result(result, self.state.values_at(result.step, facts))
            else:
                keep.append((arrived, result))
        self.state.waiting = keep


def run_train(config: Config, view: LiveView) -> int:
    spec = train_spec(config)
    assert spec.kohya is not None
    for warning in preflight(spec.kohya):
        view.message(f"warning: {warning}")
    samples = uses_samples(config)
    inputs = (check_sample_inputs(spec) if samples else check_inputs(spec)) if config.eval.enabled else None
    share = cpu_share(config, spec)
    if share.describe():
        view.message(share.describe())
    with OutputLock(spec.output_dir), SignalCatcher() as caught:
        run = TrainRun(spec, view, caught, share)
        state = run.state
        watcher = None
        if config.eval.enabled and inputs is not None:
            load = (lambda: build_sample_models(spec, inputs)) if samples else (lambda: build_models(spec, inputs))
            run.worker = EvalWorker(load, state.events.put, threads=share.eval_threads,
                                    nice=share.eval_nice, newest_first=config.eval.newest_first,
                                    baseline=not samples and BASELINE not in state.tracker.done())
            watcher = sample_watcher(spec, run.worker, len(inputs.prompts), state.tracker.done()) if samples else None
            before = {p.name for p in list_checkpoints(spec.output_dir)}  # an earlier run's files: eval-dir's job
            watcher = watcher or CheckpointWatcher(
                spec.output_dir,
                lambda p: state.events.put(ev.FileComplete(p)),
                lambda p: state.events.put(ev.FileDeleted(p)),
                ignore=before | state.tracker.done(),
            )
            run.worker.start()
            watcher.start()
        started = time.monotonic()
        if spec.logging_dir is not None:
            run.logs = LogFollower(spec.logging_dir, since=time.time() - 1.0)
        run.proc.start()
        view.message(f"kohya started (pid {run.proc.pid}); output {spec.output_dir}")
        code = _follow(run)
        timings = {"training_s": round(time.monotonic() - started, 1)}
        if watcher is not None:
            watcher.stop()
            _finish_evaluations(run)
        timings["total_s"] = round(time.monotonic() - started, 1)
        state.decisions.finish(early_stop=state.stop_reason, stop_step=state.stop_step, timings=timings)
        state.close()
    if state.stop_reason and caught.signum is None and code != 0:
        code = 0  # stopped on purpose: the saved checkpoints are the result
    if caught.signum is not None:
        code = 128 + caught.signum
    return code


def cpu_share(config: Config, spec: RunSpec) -> CpuShare:
    """How kohya and the evaluator share the CPU (see lora_monitor/cpu_share.py); nothing without evaluation."""
    if not config.eval.enabled or spec.kohya is None:
        return CpuShare()
    from lora_monitor.evaluation.pipeline_loading import resolve_device

    on_cpu = resolve_device(device_name(config)).type == "cpu"
    return plan(spec.kohya, on_cpu, os.environ, usable_cores())


def exit_report(code: int, last_lines: tuple[str, ...], python: str | None) -> list[str]:
    """What to show when kohya failed: its code, its last lines, and a hint for a known cause.

    `python`: [kohya] python (None: kohya ran on lora-monitor's interpreter, which lacks kohya's packages).
    """
    out = [f"kohya exited with code {code}; its last lines:", *(f"  | {line}" for line in last_lines[-20:])]
    missing = next((m for m in map(MISSING_MODULE_RE.search, reversed(last_lines)) if m), None)
    if missing and python is None:
        out.append(f"hint: kohya ran on lora-monitor's Python, which has no '{missing.group('name')}' (one of "
                   "kohya's packages); set [kohya] python to kohya's own venv, e.g. "
                   "python = \"/path/to/sd-scripts/venv/bin/python\"")
    elif missing:
        out.append(f"hint: [kohya] python = {python} has no '{missing.group('name')}'; install kohya's "
                   "requirements there (pip install -r requirements.txt in sd-scripts) or point it at kohya's venv")
    return out


def _follow(run: TrainRun) -> int:
    """Until kohya exits: route events, write rows, stop kohya on a signal or an early stop."""
    assert run.spec.kohya is not None
    state, view = run.state, run.view
    stopping = False
    exit_code: int | None = None
    while exit_code is None:
        for item in run.pump(0.25):
            assert isinstance(item, ev.TrainerExited)
            exit_code = item.returncode
            if item.returncode not in (0, None) and not stopping:
                for line in exit_report(item.returncode, item.last_lines, run.spec.kohya.python):
                    view.message(line)
        wants_stop = run.caught.signum is not None or state.stop_reason is not None
        if wants_stop and not stopping and exit_code is None:
            stopping = True
            why = signal.Signals(run.caught.signum).name if run.caught.signum else "early stop"
            grace = run.spec.kohya.stop_grace_s
            view.message(f"{why}: stopping kohya (SIGINT, then SIGTERM/SIGKILL after {grace:.0f} s)")
            # stop() blocks up to the grace period; events keep queueing meanwhile.
            exit_code = run.proc.stop(grace)
        if state.fatal and exit_code is None and not stopping:
            view.message("evaluation is off for this run; training goes on")
            state.fatal = None
    run.proc.wait()
    run.pump(0.05)
    return exit_code


def _finish_evaluations(run: TrainRun) -> None:
    """After kohya: evaluate what is queued (and backfill), saying what and how long; Ctrl-C again skips it."""
    finish_evaluations(run)
