"""Which saved checkpoints to evaluate, and in what order.

`EvalSchedule` thins out the checkpoints kohya saves (evaluation costs seconds, saves can come every few
steps); `EvalQueue` orders the accepted ones: the newest first while training runs, so the live view follows
the run, and the skipped older ones afterwards (backfill), so the final curves have no holes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from lora_monitor.errors import UserError

# (until_step, every): evaluate every 50 steps up to step 100, every 20 up to 200, then every 10.


class EvalSchedule:
    """Decides, checkpoint by checkpoint in save order, whether to evaluate it.

    every_n_steps: a fixed interval in training steps (>= 1).
    dynamic: (until_step, every) pairs with increasing until_step: up to and including until_step the
        interval is `every`; past the last until_step the last interval goes on. Exactly one of the two
        is given (with neither, `EveryCheckpoint` is the schedule).

    A checkpoint is evaluated when it is final, its step is unknown, its step is 0 (the untrained
    baseline), or at least the interval in force at its step has passed since the last checkpoint this
    schedule accepted (counting from step 0). With saves on multiples of the interval this is the same as
    "step % every == 0"; unlike a modulo it still evaluates when kohya's save interval is not a divisor
    (saves every 30 with every 50 evaluates 60, 120, ...). The schedule therefore keeps state: ask it once
    per checkpoint, in save order. Thread-safe.
    """

    def __init__(
        self, every_n_steps: int | None = None, dynamic: Sequence[tuple[int, int]] | None = None
    ) -> None:
        if every_n_steps is not None and dynamic is not None:
            raise UserError(
                "eval schedule: set either every_n_steps or dynamic, not both; remove one of them"
            )
        if every_n_steps is None and dynamic is None:
            raise UserError("eval schedule: set every_n_steps or dynamic")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or every_n_steps < 1):
            raise UserError(f"eval schedule: every_n_steps = {every_n_steps!r} must be a whole number >= 1")
        self.every_n_steps = every_n_steps
        self.dynamic: tuple[tuple[int, int], ...] = _checked_dynamic(
            dynamic if dynamic is not None else [(1, every_n_steps or 1)]
        )
        self._last_step = 0
        self._lock = threading.Lock()

    def interval_at(self, step: int) -> int:
        """The evaluation interval (training steps) in force at `step`."""
        if self.every_n_steps is not None:
            return self.every_n_steps
        for until_step, every in self.dynamic:
            if step <= until_step:
                return every
        return self.dynamic[-1][1]

    def should_eval(self, step: int | None, is_final: bool) -> bool:
        """Whether to evaluate the checkpoint saved at `step` (None: unknown); the answer is recorded."""
        if step is None:
            return True
        with self._lock:
            accept = is_final or step == 0 or step - self._last_step >= self.interval_at(step)
            if accept and step > self._last_step:
                self._last_step = step
            return accept

    def __repr__(self) -> str:
        rule = (
            f"every_n_steps={self.every_n_steps}"
            if self.every_n_steps is not None
            else f"dynamic={self.dynamic}"
        )
        return f"EvalSchedule({rule})"


class EveryCheckpoint:
    """No [eval] schedule: every file kohya saves, also an epoch file saved at the step of a step file."""

    def should_eval(self, step: int | None, is_final: bool) -> bool:
        return True


def _checked_dynamic(dynamic: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    pairs = tuple((int(until), int(every)) for until, every in dynamic)
    if not pairs:
        raise UserError(
            "eval schedule: dynamic is empty; give (until_step, every) pairs such as [[100, 50], [1e9, 10]]"
        )
    for i, (until, every) in enumerate(pairs):
        if every < 1:
            raise UserError(f"eval schedule: dynamic[{i}] = ({until}, {every}): every must be >= 1")
        if i and until <= pairs[i - 1][0]:
            raise UserError(
                f"eval schedule: dynamic[{i}] until_step {until} is not after {pairs[i - 1][0]}; "
                "list the pairs by increasing until_step"
            )
    return pairs


T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    item: T
    step: int | None
    seq: int
    first: bool = False  # the run's baseline: before every checkpoint, in either order

    def age_key(self) -> tuple[bool, bool, int, int]:
        """Older first: by step, unknown steps (usually the final file) after known ones, then push order."""
        return (not self.first, self.step is None, self.step if self.step is not None else 0, self.seq)

    def newest_key(self) -> tuple[bool, bool, int, int]:
        """Newest first by step; of files saved at one step the first saved (kohya's step file before its
        epoch or final twin, so the twin is the one reported as a duplicate)."""
        return (self.first, self.step is None, self.step if self.step is not None else 0, -self.seq)


class EvalQueue(Generic[T]):
    """Checkpoints waiting for evaluation. Thread-safe: the watcher pushes, the evaluator pops.

    newest_first=True: `pop` returns the newest pending checkpoint (highest step; unknown step counts as
    newest), leaving the older ones pending for `backfill`. newest_first=False: oldest first. Either way an item
    pushed as `first` (the baseline, from kohya's first samples) comes before every checkpoint: the rows after it
    are compared with it.
    """

    def __init__(self, newest_first: bool = True) -> None:
        self.newest_first = newest_first
        self._entries: list[_Entry[T]] = []
        self._seq = 0
        self._ready = threading.Condition()

    def push(self, item: T, step: int | None, first: bool = False) -> bool:
        """Queue `item` saved at `step` (`first`: the baseline, popped before any checkpoint); False (and nothing
        queued) when an equal item is already pending."""
        with self._ready:
            if any(entry.item == item for entry in self._entries):
                return False
            self._entries.append(_Entry(item, step, self._seq, first))
            self._seq += 1
            self._ready.notify()
            return True

    def pop(self, timeout: float = 0.0) -> T | None:
        """The next item to evaluate, waiting up to `timeout` seconds for one; None when none came."""
        with self._ready:
            if not self._entries and timeout > 0:
                self._ready.wait_for(lambda: bool(self._entries), timeout=timeout)
            if not self._entries:
                return None
            if self.newest_first:
                entry = max(self._entries, key=_Entry.newest_key)
            else:
                entry = min(self._entries, key=_Entry.age_key)
            self._entries.remove(entry)
            return entry.item

    def backfill(self) -> list[T]:
        """Take every pending item, oldest first: what is left to evaluate once training has ended."""
        with self._ready:
            entries = sorted(self._entries, key=_Entry.age_key)
            self._entries.clear()
            return [entry.item for entry in entries]

    def pending(self) -> list[T]:
        """The pending items in the order `pop` would return them (nothing is removed)."""
        with self._ready:
            if self.newest_first:
                return [e.item for e in sorted(self._entries, key=_Entry.newest_key, reverse=True)]
            return [e.item for e in sorted(self._entries, key=_Entry.age_key)]

    def __len__(self) -> int:
        with self._ready:
            return len(self._entries)
