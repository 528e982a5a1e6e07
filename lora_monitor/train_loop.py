"""`lora-monitor train`: launch kohya, follow it, evaluate each checkpoint as it appears.

Exit code: kohya's own; 0 after an early stop; 130/143 when the monitor itself got SIGINT/SIGTERM.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from pathlib import Path

from lora_monitor import events as ev
from lora_monitor.config import Config
from lora_monitor.errors import UserError
from lora_monitor.kohya_process import KohyaProcess, build_argv, effective_args, preflight
from lora_monitor.live import LiveView
from lora_monitor.lock import OutputLock
from lora_monitor.pipeline import EvalWorker, build_models, check_inputs, drain
from lora_monitor.runner import LOSS_WAIT_S, _Loop, _SignalCatcher, ready_of, schedule_of
from lora_monitor.watcher import CheckpointWatcher, list_checkpoints


def _with_logging_dir(config: Config, output_dir: Path) -> Config:
    """kohya prints no learning rate; its TensorBoard logs have it, so make sure it writes them."""
    assert config.kohya is not None
    if config.kohya.args.get("logging_dir") or config.kohya.args.get("log_with") == "wandb":
        return config
    args = {**config.kohya.args, "logging_dir": str(output_dir / "logs")}
    return dataclasses.replace(config, kohya=dataclasses.replace(config.kohya, args=args))


def _loss_is_final(proc: KohyaProcess, redraws: dict[int, int], step: int | None, waited: float) -> bool:
    """kohya redraws a step with the updated avr_loss right after saving; wait for that redraw."""
    if step is None or proc.returncode is not None or waited > LOSS_WAIT_S:
        return True
    return (proc.parser.current_step or 0) > step or redraws.get(step, 0) >= 2


def run_train(config: Config, view: LiveView) -> int:
    if config.kohya is None:
        raise UserError(f"{config.source}: no [kohya] section; add [kohya] with sd_scripts and [kohya.args]")
    merged = effective_args(config.kohya)
    if not merged.get("output_dir"):
        raise UserError(f"{config.source}: kohya.args.output_dir is not set; add it (kohya needs it too)")
    output_dir = Path(merged["output_dir"])
    config = _with_logging_dir(config, output_dir)
    for warning in preflight(config.kohya):
        view.message(f"warning: {warning}")
    inputs = check_inputs(config) if config.eval.enabled else None
    if config.output.tensorboard:
        from lora_monitor.tb_writer import check_available

        check_available()
    csv_path = config.csv_path(output_dir)
    assert csv_path is not None
    output_name = str(merged.get("output_name") or "last")
    with OutputLock(output_dir), _SignalCatcher() as caught:
        loop = _Loop(config, output_dir, csv_path, view)
        worker = EvalWorker(lambda: build_models(config, output_dir, inputs, config.kohya.sdxl), loop.events.put,
                            newest_first=config.eval.newest_first)
        schedule = schedule_of(config)
        before = {p.name for p in list_checkpoints(output_dir)}  # an earlier run's files: eval-dir's job
        watcher = CheckpointWatcher(
            output_dir,
            lambda p: loop.events.put(("ready", p)),
            lambda p: loop.events.put(("removed", p)),
            ignore=before | loop.tracker.done(),
        )
        if config.eval.enabled:
            worker.start()
            watcher.start()
        proc = KohyaProcess(build_argv(config.kohya), cwd=config.kohya.sd_scripts, on_event=loop.events.put)
        started = time.monotonic()
        loop.decisions.logs_since = time.time() - 1.0
        proc.start()
        view.message(f"kohya started (pid {proc.pid}); output {output_dir}")
        code = _follow(loop, proc, worker, watcher, schedule, output_name, caught, config)
        timings = {"training_s": round(time.monotonic() - started, 1)}
        if config.eval.enabled:
            watcher.stop()
            _finish_evaluations(loop, proc, worker, schedule, output_name, caught)
        timings["total_s"] = round(time.monotonic() - started, 1)
        loop.decisions.finish(early_stop=loop.stop_reason, timings=timings)
        loop.close()
    if loop.stop_reason and caught.signum is None and code != 0:
        code = 0  # stopped on purpose: the saved checkpoints are the result
    if caught.signum is not None:
        code = 128 + caught.signum
    return code


def _handle(loop: _Loop, item: object, worker: EvalWorker, schedule: object, output_name: str) -> None:
    view = loop.view
    if isinstance(item, ev.TrainProgress):
        loop.redraws[item.step] = loop.redraws.get(item.step, 0) + 1
        view.progress(item.step, item.total, item.loss, item.rate)
    elif isinstance(item, ev.EpochStarted):
        view.set_epoch(item.epoch, item.total)
    elif isinstance(item, ev.CheckpointSaving):
        view.message(f"kohya is saving {item.path.name}")
    elif isinstance(item, ev.CheckpointRemoved):
        view.message(f"kohya removed {item.path.name}")
    elif isinstance(item, ev.TrainerLog) and item.level == "error":
        view.message(f"kohya: {item.text}")
    elif isinstance(item, tuple) and item[0] == "ready":
        ready = ready_of(item[1], output_name)
        if schedule.should_eval(ready.step, ready.is_final):  # type: ignore[attr-defined]
            worker.submit(ready)
    else:
        loop.handle_common(item)


def _write_settled(loop: _Loop, proc: KohyaProcess) -> None:
    now = time.monotonic()
    keep = []
    loop.facts.loss_at_step = dict(proc.parser.loss_at_step)
    loop.facts.epoch_at_step = dict(proc.parser.epoch_at_step)
    for arrived, result in loop.waiting:
        if _loss_is_final(proc, loop.redraws, result.step, now - arrived):
            loop.write_result(result)
        else:
            keep.append((arrived, result))
    loop.waiting = keep


def _follow(loop: _Loop, proc: KohyaProcess, worker: EvalWorker, watcher: CheckpointWatcher,
            schedule: object, output_name: str, caught: _SignalCatcher, config: Config) -> int:
    """Until kohya exits: route events, write rows, stop kohya on a signal or an early stop."""
    assert config.kohya is not None
    stopping = False
    exit_code: int | None = None
    while exit_code is None:
        for item in drain(loop.events, 0.25):
            if isinstance(item, ev.TrainerExited):
                exit_code = item.returncode
                if item.returncode not in (0, None) and not stopping:
                    loop.view.message(f"kohya exited with code {item.returncode}; its last lines:")
                    for line in item.last_lines[-20:]:
                        loop.view.message(f"  | {line}")
            else:
                _handle(loop, item, worker, schedule, output_name)
        _write_settled(loop, proc)
        loop.view.set_queue([r.path.name for r in worker.pending()],
                            worker.busy_with.name if worker.busy_with else None)
        loop.view.refresh()
        wants_stop = caught.signum is not None or loop.stop_reason is not None
        if wants_stop and not stopping and exit_code is None:
            stopping = True
            why = signal.Signals(caught.signum).name if caught.signum else "early stop"
            loop.view.message(f"{why}: stopping kohya (SIGINT, then SIGTERM/SIGKILL after "
                              f"{config.kohya.stop_grace_s:.0f} s)")
            # stop() blocks up to the grace period; events keep queueing meanwhile.
            exit_code = proc.stop(config.kohya.stop_grace_s)
        if loop.fatal and exit_code is None and not stopping:
            loop.view.message("evaluation is off for this run; training goes on")
            loop.fatal = None
    proc.wait()
    for item in drain(loop.events, 0.05):
        if not isinstance(item, ev.TrainerExited):
            _handle(loop, item, worker, schedule, output_name)
    return exit_code


def _finish_evaluations(loop: _Loop, proc: KohyaProcess, worker: EvalWorker, schedule: object,
                        output_name: str, caught: _SignalCatcher) -> None:
    """After kohya: evaluate what is queued (and backfill), unless the user presses Ctrl-C again."""
    first_signal = caught.signum
    caught.signum = None
    for item in drain(loop.events, 0.05):  # the watcher's last hand-overs, before the worker closes
        _handle(loop, item, worker, schedule, output_name)
    dropped = worker.close(timeout=0, backfill=loop.config.eval.backfill)
    if dropped:
        loop.view.message(f"not evaluated (backfill off): {', '.join(r.path.name for r in dropped)}")
    while worker.alive():
        for item in drain(loop.events, 0.25):
            _handle(loop, item, worker, schedule, output_name)
        _write_settled(loop, proc)
        loop.view.set_queue([r.path.name for r in worker.pending()],
                            worker.busy_with.name if worker.busy_with else None)
        loop.view.refresh()
        if caught.signum is not None:
            loop.view.message("second signal: leaving the remaining evaluations to `lora-monitor eval-dir`")
            break
    for item in drain(loop.events, 0.05):
        _handle(loop, item, worker, schedule, output_name)
    _write_settled(loop, proc)
    if first_signal is not None:
        caught.signum = first_signal
