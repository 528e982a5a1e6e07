"""`train` after kohya has exited: the evaluations still queued, saying which and about how long they take.

A further Ctrl-C (or one already pressed while kohya was stopping) skips the queue: the rows already written
stay, the skipped checkpoints are named and left for `lora-monitor eval-dir`. The evaluation in hand is
waited for (at most WORKER_EXIT_WAIT_S): the worker thread may be inside torch, and a process that exits
under such a thread can abort. Ctrl-C once more quits without waiting.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

from lora_monitor.eval_dir import WORKER_EXIT_WAIT_S
from lora_monitor.evaluation.worker import EvalWorker
from lora_monitor.run_spec import RunSpec
from lora_monitor.run_state import RunState, SignalCatcher
from lora_monitor.tracking.live import LiveView

RECENT = 5  # the estimate averages this many of the latest timed evaluations: the run's current speed
EVAL_DIR = "`lora-monitor eval-dir`"


class Run(Protocol):
    """What of a train run finishing needs (train_loop.TrainRun)."""

    spec: RunSpec
    state: RunState
    view: LiveView
    caught: SignalCatcher
    worker: EvalWorker | None

    def pump(self, timeout: float) -> list[object]: ...


def seconds_each(rows: list[Mapping[str, Any]]) -> float | None:
    """Mean eval_seconds of the latest RECENT evaluated rows (duplicates and failures are not timed)."""
    timed = [float(r["eval_seconds"]) for r in rows if r.get("status") == "ok" and r.get("eval_seconds")]
    recent = timed[-RECENT:]
    return sum(recent) / len(recent) if recent else None


def seconds_left(each: float | None, queued: int, elapsed: float) -> float | None:
    """What the one in hand (running for `elapsed` s) and `queued` more should take; None when not timed yet."""
    if each is None:
        return None
    return max(0.0, each - elapsed) + each * queued


def countdown(left: float | None) -> str:
    return "time left unknown until an evaluation is timed" if left is None else f"~{math.ceil(left)} s left"


def waiting_text(in_hand: str | None, queued: list[str], signalled: bool) -> str:
    """What the run waits for, e.g. `evaluating a (2 queued: b, c); Ctrl-C again to skip`."""
    what = f"evaluating {in_hand}" if in_hand else "starting the evaluator"
    shown = ", ".join(queued[:3]) + (f" and {len(queued) - 3} more" if len(queued) > 3 else "")
    queue = f" ({len(queued)} queued: {shown})" if queued else ""
    again = "again " if signalled else ""
    return f"kohya has ended; {what}{queue}; Ctrl-C {again}to skip (left for {EVAL_DIR})"


def finish_evaluations(run: Run) -> None:
    """Evaluate what is queued (and backfill) with a live countdown, unless Ctrl-C skips it."""
    worker, caught, view = run.worker, run.caught, run.view
    assert worker is not None
    first_signal = caught.signum
    seen = caught.count
    caught.signum = None
    run.pump(0.05)  # the watcher's last hand-overs, before the worker closes
    dropped = worker.close(timeout=0, backfill=run.spec.config.eval.backfill)
    if dropped:
        view.message(f"not evaluated (backfill off): {', '.join(r.path.name for r in dropped)}")
    skip = seen >= 2  # pressed again while kohya was stopping: the user already asked
    in_hand, since = None, time.monotonic()
    while worker.alive() and not skip:
        run.pump(0.25)
        if worker.busy_with != in_hand:
            in_hand, since = worker.busy_with, time.monotonic()
        queued = [r.path.name for r in worker.pending()]
        each = seconds_each(run.state.tracker.rows)
        left = seconds_left(each, len(queued), time.monotonic() - since) if in_hand else None
        skip = caught.count > seen
        if in_hand is None and not queued and worker.models is not None:
            continue  # the last result is in; the thread is only ending: nothing to announce
        view.set_status(waiting_text(in_hand.name if in_hand else None, queued, seen >= 1), countdown(left))
    if skip and worker.alive():
        _skip_queue(run)
    view.set_status(None)
    run.pump(0.05)
    if first_signal is not None:
        caught.signum = first_signal


def _skip_queue(run: Run) -> None:
    worker, caught, view = run.worker, run.caught, run.view
    assert worker is not None
    skipped = [r.path.name for r in worker.queue.backfill()]
    if skipped:
        view.message(f"skipped {len(skipped)} queued evaluation(s), left for {EVAL_DIR}: {', '.join(skipped)}")
    seen, started = caught.count, time.monotonic()
    in_hand = worker.busy_with
    while worker.alive() and time.monotonic() - started < WORKER_EXIT_WAIT_S:
        run.pump(0.25)
        in_hand = worker.busy_with or in_hand
        name = in_hand.name if in_hand else "the evaluator's start"
        view.set_status(f"finishing {name} (in hand); Ctrl-C again to quit without waiting",
                        f"{time.monotonic() - started:.0f} s")
        if caught.count > seen:
            break
    if worker.alive():
        name = worker.busy_with.name if worker.busy_with else "the evaluator's start"
        view.message(f"not waiting for {name}: left for {EVAL_DIR}")
