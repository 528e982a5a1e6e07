"""Early stopping on an evaluation metric, modelled on Lightning's `EarlyStopping` callback, and on
over-training ([early_stopping] overtraining: `patience` flagged evaluations in a row, see overtraining.py).

The decision is a pure function of the evaluation history, so the live view, the log and the tests all
ask the same question and get the same answer, with a reason a person can check by hand.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass

from lora_monitor.columns import MONITORABLE
from lora_monitor.errors import UserError

METRIC_MODES = MONITORABLE  # which way is good for every column a decision may watch

_MODES = ("min", "max")
_HISTORY_SHOWN = 12  # entries of the history quoted in a reason; older ones are elided


@dataclass(frozen=True)
class EarlyStopping:
    """When to stop training because the monitored metric stopped improving.

    monitor: a metric column of the CSV (see `METRIC_MODES`).
    mode: "min" or "max"; None takes the metric's own direction from `METRIC_MODES`.
    patience: evaluations in a row without improvement after which training stops. 0 and 1 both stop at
        the first evaluation that does not improve (as Lightning does: the count is checked after it grows).
    min_delta: an evaluation improves only when it beats the best so far by more than this (metric units,
        >= 0).
    min_step: training step before which a stop is never requested; evaluations before it still count.
    enabled: False turns the decision off (never stop) while keeping the countdown for display.

    Non-finite values (NaN from a failed evaluation, +-inf) are ignored: they neither improve nor use up
    patience, because they say nothing about the LoRA's quality, only that scoring it went wrong.
    History entries are ordered by step before the decision, so a checkpoint evaluated late (backfilled
    after skipping) is judged in its place in training, not as the newest evaluation; a step that appears
    more than once (the final file duplicating the last step file) counts once, with its latest value.
    """

    monitor: str = "eval_score"
    mode: str | None = None
    patience: int = 3
    min_delta: float = 0.0
    min_step: int = 0
    enabled: bool = True

    @property
    def resolved_mode(self) -> str:
        """The mode in force: `mode` when set, else the monitored metric's direction."""
        if self.mode is not None:
            return self.mode
        if self.monitor in METRIC_MODES:
            return METRIC_MODES[self.monitor]
        raise UserError(
            f"early stopping: metric {self.monitor!r} has no known direction; "
            'set mode = "min" (lower is better) or mode = "max" (higher is better)'
        )

    def validate(self, valid_names: Iterable[str]) -> None:
        """Raise UserError (one line, listing the valid names) for a setting that cannot work."""
        names = sorted(set(valid_names))
        if self.monitor not in names:
            close = difflib.get_close_matches(self.monitor, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"early stopping: monitor = {self.monitor!r} is not a metric of this run{hint}; "
                f"use one of: {', '.join(names)}"
            )
        if self.mode is not None and self.mode not in _MODES:
            raise UserError(
                f'early stopping: mode = {self.mode!r} is not valid; use "min", "max" or leave it out'
            )
        self.resolved_mode  # noqa: B018 - raises UserError when the direction is unknown
        if self.patience < 0:
            raise UserError(f"early stopping: patience = {self.patience} is negative; use 0 or more")
        if not math.isfinite(self.min_delta) or self.min_delta < 0:
            raise UserError(f"early stopping: min_delta = {self.min_delta} must be a finite number >= 0")
        if self.min_step < 0:
            raise UserError(f"early stopping: min_step = {self.min_step} is negative; use 0 or more")

    def _improves(self, value: float, best: float) -> bool:
        if self.resolved_mode == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def _replay(self, history: list[tuple[int, float]]) -> tuple[list[tuple[int, float]], int | None, int]:
        """Finite entries in step order, the index of the best one (None if none) and evaluations since it."""
        latest: dict[int, float] = {}
        for step, value in history:
            if math.isfinite(value):
                latest[step] = value  # a step evaluated twice (e.g. a duplicate final file) counts once
        finite = sorted(latest.items())
        best_index: int | None = None
        waited = 0
        for i, (_, value) in enumerate(finite):
            if best_index is None or self._improves(value, finite[best_index][1]):
                best_index, waited = i, 0
            else:
                waited += 1
        return finite, best_index, waited

    def evaluations_left(self, history: list[tuple[int, float]]) -> int:
        """Evaluations without improvement still allowed before a stop (the live view's countdown, >= 0)."""
        _, _, waited = self._replay(history)
        return max(max(self.patience, 1) - waited, 0)

    def decide(self, history: list[tuple[int, float]]) -> tuple[bool, str]:
        """(stop, reason) after the evaluations in `history`, a list of (step, value) in evaluation order.

        The reason names the monitored metric, the step decided at, the best value and its step, and the
        (step-ordered, finite) history, so it can be logged and shown as is.
        """
        finite, best_index, waited = self._replay(history)
        name = self.monitor
        if best_index is None:
            return False, f"{name}: no finite value yet ({len(history)} evaluation(s))"
        step = finite[-1][0]
        best_step, best_value = finite[best_index]
        needed = max(self.patience, 1)
        delta = f" by more than {self.min_delta:g}" if self.min_delta > 0 else ""
        shown = ", ".join(f"{s}: {v:.4g}" for s, v in finite[-_HISTORY_SHOWN:])
        if len(finite) > _HISTORY_SHOWN:
            shown = "..., " + shown
        facts = f"best {best_value:.4g} at step {best_step} ({self.resolved_mode}); history [{shown}]"
        if waited < needed:
            state = "improved" if waited == 0 else f"{waited} of {needed} evaluation(s) without improvement"
            return False, f"{name} at step {step}: {state}; {facts}"
        if not self.enabled:
            return False, f"{name} at step {step}: early stopping disabled; {facts}"
        if step < self.min_step:
            return False, (
                f"{name} at step {step}: no improvement{delta} for {waited} evaluation(s) but min_step is "
                f"{self.min_step}; {facts}"
            )
        return True, (
            f"early stop at step {step}: {name} did not improve{delta} for {waited} evaluation(s); {facts}"
        )


@dataclass(frozen=True)
class OvertrainingStop:
    """Stop once `patience` evaluations in a row are flagged as over-trained ([early_stopping] overtraining).

    The history is (step, reasons) per evaluation, reasons empty when the checkpoint is clean (see
    `overtraining.flags`). Ordered by step like `EarlyStopping`, a step seen twice counting once with its
    latest reasons, so a backfilled clean checkpoint between flagged ones breaks their run. patience 0 and
    1 both stop at the first flagged evaluation; no stop before `min_step`; `enabled` False never stops.
    """

    patience: int = 3
    min_step: int = 0
    enabled: bool = True

    def _streak(self, history: list[tuple[int, list[str]]]) -> list[tuple[int, list[str]]]:
        """The trailing run of flagged evaluations, in step order."""
        latest: dict[int, list[str]] = {}
        for step, reasons in history:
            latest[step] = list(reasons)
        streak: list[tuple[int, list[str]]] = []
        for step, reasons in sorted(latest.items()):
            streak = [*streak, (step, reasons)] if reasons else []
        return streak

    def evaluations_left(self, history: list[tuple[int, list[str]]]) -> int:
        """Flagged evaluations still allowed before a stop (the live view's countdown, >= 0)."""
        return max(max(self.patience, 1) - len(self._streak(history)), 0)

    def decide(self, history: list[tuple[int, list[str]]]) -> tuple[bool, str]:
        """(stop, reason); the reason names the steps of the run and the latest evaluation's flags."""
        streak = self._streak(history)
        needed = max(self.patience, 1)
        if not streak:
            return False, f"over-training: the latest of {len(history)} evaluation(s) is not flagged"
        step, reasons = streak[-1]
        steps = ", ".join(str(s) for s, _ in streak[-_HISTORY_SHOWN:])
        if len(streak) > _HISTORY_SHOWN:
            steps = "..., " + steps
        facts = f"flagged at steps {steps}; at step {step}: {'; '.join(reasons)}"
        if len(streak) < needed:
            return False, f"over-training at step {step}: {len(streak)} of {needed} flagged evaluation(s); {facts}"
        if not self.enabled:
            return False, f"over-training at step {step}: stopping on it is off; {facts}"
        if step < self.min_step:
            return False, (f"over-training at step {step}: {len(streak)} flagged evaluation(s) in a row but "
                           f"min_step is {self.min_step}; {facts}")
        return True, f"early stop at step {step}: over-trained for {len(streak)} evaluation(s) in a row; {facts}"
