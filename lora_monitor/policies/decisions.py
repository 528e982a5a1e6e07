"""After each row: keep the best checkpoint published, ask early stopping, and at the end write the report.

This module only wires the small policy objects (early_stopping, best_checkpoint) to the run; the
decisions themselves live there as pure functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_monitor.config import Config
from lora_monitor.errors import UserError
from lora_monitor.policies.best_checkpoint import select_best, write_best
from lora_monitor.policies.early_stopping import METRIC_MODES, EarlyStopping
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


class Decisions:
    def __init__(self, spec: RunSpec, tracker: Tracker) -> None:
        self.spec = spec
        self.output_dir = spec.output_dir
        self.tracker = tracker
        self.rule = early_stopping_of(spec.config)
        self.mode = self.rule.resolved_mode
        self.best_row: dict[str, Any] | None = None

    def after_row(self, row: dict[str, str]) -> Verdict:
        monitor = self.rule.monitor
        best = select_best(self.tracker.rows, monitor, self.mode)
        best_text = None
        if best is not None:
            best_text = f"{best['checkpoint']} (step {best.get('step')}, {monitor} {float(best[monitor]):.4f})"
            if best is not self.best_row and best.get("checkpoint") != (self.best_row or {}).get("checkpoint"):
                path = self.output_dir / best["checkpoint"]
                if path.exists():
                    try:
                        write_best(self.output_dir, self.spec.best_name, best,
                                   f"{'lowest' if self.mode == 'min' else 'highest'} {monitor}", path)
                    except OSError as exc:
                        log.warning("could not publish the best checkpoint: %s", exc)
            self.best_row = best
        history = self.tracker.history(monitor)
        left = self.rule.evaluations_left(history)
        patience = f"{left} evaluation(s) without improvement left" if self.rule.enabled else None
        stop, reason = self.rule.decide(history) if self.rule.enabled else (False, "")
        return Verdict(stop=stop, reason=reason if stop else None, best_text=best_text, patience_text=patience)

    def record_early_stop(self, reason: str, row: dict[str, str]) -> Path:
        """`early_stop.json` beside best.json: why training was stopped, the history judged, the best."""
        import json

        from lora_monitor.policies.best_checkpoint import atomic_write_bytes

        record = {
            "reason": reason,
            "step": int(row["step"]) if row.get("step") else None,
            "monitor": self.rule.monitor,
            "mode": self.mode,
            "patience": self.rule.patience,
            "history": self.tracker.history(self.rule.monitor),
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
