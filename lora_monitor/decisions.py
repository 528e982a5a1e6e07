"""After each row: keep the best checkpoint published, ask early stopping, and at the end write the report.

This module only wires the small policy objects (early_stopping, best_checkpoint) to the run; the
decisions themselves live there as pure functions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_monitor.best_checkpoint import select_best, write_best
from lora_monitor.config import Config
from lora_monitor.early_stopping import METRIC_MODES, EarlyStopping
from lora_monitor.errors import UserError
from lora_monitor.rows import TrainerFacts
from lora_monitor.tracker import Tracker

log = logging.getLogger(__name__)


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
    def __init__(self, config: Config, output_dir: Path, tracker: Tracker) -> None:
        self.config = config
        self.output_dir = output_dir
        self.tracker = tracker
        self.rule = early_stopping_of(config)
        self.mode = self.rule.resolved_mode
        self.best_row: dict[str, Any] | None = None
        self.logs_since: float | None = None  # train: ignore event files older than this launch

    def _logging_dir(self) -> Path | None:
        value = self.config.kohya.args.get("logging_dir") if self.config.kohya else None
        return Path(value) if value else None

    def _scalars(self) -> dict[str, dict[int, float]]:
        folder = self._logging_dir()
        if folder is None or not folder.exists():
            return {}
        from lora_monitor.tb_scalars import read_scalars

        try:
            return read_scalars(folder, since=self.logs_since)
        except Exception as exc:  # noqa: BLE001 - unreadable logs only cost us the lr column
            log.warning("could not read TensorBoard logs in %s: %s", folder, exc)
            return {}

    def learning_rates(self, scalars: dict[str, dict[int, float]] | None = None) -> dict[int, float]:
        """Learning rate per step from kohya's TensorBoard logs (kohya never prints it)."""
        from lora_monitor.tb_scalars import learning_rate_at

        scalars = self._scalars() if scalars is None else scalars
        steps = set().union(*(s.keys() for s in scalars.values())) if scalars else set()
        out = {}
        for step in steps:
            value = learning_rate_at(scalars, step)
            if value is not None:
                out[step] = value
        return out

    def facts_from_logs(self) -> TrainerFacts:
        """For eval-dir (no live trainer): loss and lr per step from kohya's TensorBoard logs, when present."""
        scalars = self._scalars()
        facts = TrainerFacts(lr_at_step=self.learning_rates(scalars))  # one read of the event files
        facts.loss_at_step = dict(scalars.get("loss/average", {}))
        return facts

    def after_row(self, row: dict[str, str], checkpoint: Path) -> Verdict:
        monitor = self.rule.monitor
        best = select_best(self.tracker.rows, monitor, self.mode)
        best_text = None
        if best is not None:
            best_text = f"{best['checkpoint']} (step {best.get('step')}, {monitor} {float(best[monitor]):.4f})"
            if best is not self.best_row and best.get("checkpoint") != (self.best_row or {}).get("checkpoint"):
                path = self.output_dir / best["checkpoint"]
                if path.exists():
                    try:
                        write_best(self.output_dir, self.config.output_name, best,
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

        from lora_monitor.best_checkpoint import atomic_write_bytes

        record = {
            "reason": reason,
            "step": int(row["step"]) if row.get("step") else None,
            "monitor": self.rule.monitor,
            "mode": self.mode,
            "patience": self.rule.patience,
            "history": self.tracker.history(self.rule.monitor),
            "best": (self.best_row or {}).get("checkpoint"),
        }
        path = self.output_dir / "early_stop.json"
        atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
        return path

    def finish(self, early_stop: str | None, timings: dict[str, Any] | None = None) -> Path | None:
        if not self.config.output.report:
            return None
        try:
            return write_report(self.config, self.output_dir, self.tracker.path, early_stop, timings)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - a report failure must not turn a finished run into an error
            log.warning("report not written: %s", exc)
            return None


def write_report(config: Config, output_dir: Path, csv_path: Path | None, early_stop: str | None = None,
                 timings: dict[str, Any] | None = None) -> Path:
    import json

    from lora_monitor.report import build_report

    csv_path = csv_path or output_dir / "loss_tracker.csv"
    if not csv_path.exists():
        raise UserError(f"{csv_path}: no CSV to report on; run train or eval-dir first, or pass --csv")
    best_file = output_dir / "best.json"
    best = json.loads(best_file.read_text()) if best_file.exists() else None
    return build_report(output_dir, csv_path, config.text or None, best, early_stop=early_stop, timings=timings)
