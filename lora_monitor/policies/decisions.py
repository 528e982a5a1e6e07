"""After each row: keep the best checkpoint published, ask early stopping, and at the end write the report.

This module only wires the small policy objects (overtraining, early_stopping, best_checkpoint) to the
run; the decisions themselves live there as pure functions. The over-training flags are judged afresh over
all rows after each one, since a row written late (the baseline, a backfilled step) changes earlier flags.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_monitor.config import Config
from lora_monitor.errors import UserError
from lora_monitor.policies.best_checkpoint import (
    RANKED_BY,
    Choice,
    choose_best,
    exclusions_text,
    write_best,
    write_no_best,
)
from lora_monitor.policies.early_stopping import METRIC_MODES, EarlyStopping, OvertrainingStop
from lora_monitor.policies.overtraining import flag_rows, step_of
from lora_monitor.tracking.tracker import Tracker

if TYPE_CHECKING:
    from lora_monitor.run_spec import RunSpec

log = logging.getLogger(__name__)
EARLY_STOP_JSON = "early_stop.json"


@dataclass(frozen=True)
class Verdict:
    stop: bool = False
    reason: str | None = None
    best_text: str | None = None
    patience_text: str | None = None


def early_stopping_of(config: Config) -> EarlyStopping:
    es = config.early_stopping
    rule = EarlyStopping(monitor=es.monitor, mode=es.mode, patience=es.patience, min_delta=es.min_delta,
                         min_step=es.min_step, enabled=es.enabled)
    rule.validate(METRIC_MODES)
    return rule


def overtraining_stop_of(config: Config) -> OvertrainingStop:
    es = config.early_stopping
    return OvertrainingStop(patience=es.patience, min_step=es.min_step, enabled=es.overtraining)


def best_text(choice: Choice) -> str | None:
    """The live view's best line: the checkpoint and its score, and briefly what the rule passed over."""
    extra = exclusions_text(choice)
    if choice.none_clean:
        return f"none clean - {extra}"
    if choice.best is None:
        return None
    best = choice.best
    text = f"{best['checkpoint']} (step {best.get('step')}, {RANKED_BY} {float(best[RANKED_BY]):.4f})"
    return f"{text}; {extra}" if extra else text


class Decisions:
    def __init__(self, spec: RunSpec, tracker: Tracker) -> None:
        self.spec = spec
        self.output_dir = spec.output_dir
        self.tracker = tracker
        self.rule = early_stopping_of(spec.config)
        self.mode = self.rule.resolved_mode
        self.overtraining = overtraining_stop_of(spec.config)
        self.bounds = spec.config.best.bounds()
        self.best_row: dict[str, Any] | None = None
        self._published: tuple[Any, ...] | None = None  # what best.json says now: (checkpoint, excluded)

    def flag_history(self) -> list[tuple[int, list[str]]]:
        """(step, over-training reasons) of each evaluated checkpoint, in the order evaluated."""
        return [(step, reasons) for row, reasons in flag_rows(self.tracker.rows, self.bounds)
                if (step := step_of(row)) is not None]

    def _publish(self, choice: Choice) -> None:
        """best.json (and the best file) when the choice or its exclusions changed since the last write."""
        key = (None if choice.best is None else choice.best.get("checkpoint"), choice.rule,
               tuple((e["checkpoint"], tuple(e["reasons"])) for e in choice.excluded), choice.flags)
        if key == self._published or (choice.best is None and not choice.none_clean):
            return
        try:
            if choice.best is None:
                write_no_best(self.output_dir, self.spec.best_name, choice.rule, choice.excluded)
            else:
                path = self.output_dir / choice.best["checkpoint"]
                if not path.exists():  # deleted since (kohya's --save_last_n_steps): keep the previous best
                    return
                write_best(self.output_dir, self.spec.best_name, choice.best, choice.rule, path,
                           choice.excluded, choice.flags)
        except OSError as exc:
            log.warning("could not publish the best checkpoint: %s", exc)
            return
        self._published = key

    def after_row(self, row: dict[str, str]) -> Verdict:
        choice = choose_best(self.tracker.rows, self.spec.config.best.rule, self.bounds)
        self._publish(choice)
        self.best_row = choice.best
        history = self.tracker.history(self.rule.monitor)
        flagged = self.flag_history()
        patience = []
        if self.rule.enabled:
            patience.append(f"{self.rule.evaluations_left(history)} evaluation(s) without improvement left")
        if self.overtraining.enabled:
            patience.append(f"{self.overtraining.evaluations_left(flagged)} over-trained evaluation(s) left")
        stop, reason = self.rule.decide(history) if self.rule.enabled else (False, "")
        if not stop and self.overtraining.enabled:
            stop, reason = self.overtraining.decide(flagged)
        return Verdict(stop=stop, reason=reason if stop else None, best_text=best_text(choice),
                       patience_text="; ".join(patience) or None)

    def record_early_stop(self, reason: str, row: dict[str, str]) -> Path:
        """`early_stop.json` beside best.json: why training was stopped, the history judged, the best.

        "flags" holds each evaluated step's over-training reasons (empty: clean), which an over-training
        stop was decided on; "history" the monitored metric's values.
        """
        import json

        from lora_monitor.policies.best_checkpoint import atomic_write_bytes

        record = {
            "reason": reason,
            "step": int(row["step"]) if row.get("step") else None,
            "monitor": self.rule.monitor,
            "mode": self.mode,
            "patience": self.rule.patience,
            "overtraining": self.overtraining.enabled,
            "history": self.tracker.history(self.rule.monitor),
            "flags": [{"step": step, "reasons": reasons} for step, reasons in self.flag_history()],
            "best": (self.best_row or {}).get("checkpoint"),
        }
        path = self.output_dir / EARLY_STOP_JSON
        atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
        return path

    def finish(self, early_stop: str | None, stop_step: int | None = None,
               timings: dict[str, Any] | None = None) -> Path | None:
        """The report, when [output] report is on. Its failures are bugs and raise, except a full disk."""
        if not self.spec.config.output.report:
            return None
        try:
            return write_report(self.spec, early_stop, stop_step, timings)
        except OSError as exc:
            log.warning("report not written: %s", exc)
            return None


def write_report(spec: RunSpec, early_stop: str | None = None, stop_step: int | None = None,
                 timings: dict[str, Any] | None = None) -> Path:
    """report.html of the run; without a stop given, the run's early_stop.json says whether it stopped."""
    import json

    from lora_monitor.tracking.report import build_report

    if not spec.csv_path.exists():
        raise UserError(f"{spec.csv_path}: no CSV to report on; run train or eval-dir first, or pass --csv")
    best_file = spec.output_dir / "best.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    stop_file = spec.output_dir / EARLY_STOP_JSON
    if early_stop is None and stop_file.exists():
        record = json.loads(stop_file.read_text())
        early_stop, stop_step = record.get("reason"), record.get("step")
    return build_report(spec.output_dir, spec.csv_path, spec.config.text or None, best, early_stop=early_stop,
                        stop_step=stop_step, timings=timings)
