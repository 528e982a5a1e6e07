"""The live view: a rich table on a terminal, one plain line per event when piped to a file.

The view only displays; it decides nothing. Each metric's change is against the preceding *step*: the ok row
with the largest step below the row's own. Evaluation runs newest checkpoint first while training goes on
(older ones are backfilled later), so rows arrive out of step order; the table lists them by step.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lora_monitor.columns import BASELINE, METRICS, SIGNALS

SHOWN = tuple(m.name for m in (*METRICS, *SIGNALS))
SHORT = {m.name: m.short for m in (*METRICS, *SIGNALS)}
COUNTS = ("copies",)
EVAL_SECONDS_HEADER = "eval s"  # seconds the checkpoint's evaluation took (generate + score)


def _fmt(key: str, value: float, sign: str = "") -> str:
    """4 decimals; a count (copies) as a whole number."""
    return f"{value:{sign}.0f}" if key in COUNTS else f"{value:{sign}.4f}"


def _num(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


class LiveView:
    """Receives progress, rows and messages; renders them live (TTY) or as plain lines."""

    def __init__(self, stream: IO[str] | None = None, live: bool | None = None, max_rows: int = 8) -> None:
        self.stream = stream or sys.stdout
        self.live_mode = self.stream.isatty() if live is None else live
        self.console = Console(file=self.stream, highlight=False, soft_wrap=not self.live_mode)
        self.rows: deque[dict[str, Any]] = deque(maxlen=max_rows)
        self.ok_rows: dict[int, dict[str, Any]] = {}  # step -> its ok row: what changes are measured against
        self.baseline: dict[str, Any] | None = None  # the base model's row: each checkpoint is also read against it
        self.step = 0
        self.total: int | None = None
        self.loss: float | None = None
        self.loss_step: int | None = None  # the step `loss` belongs to
        self.rate: float | None = None
        self.epoch: str = ""
        self.queue: list[str] = []
        self.busy: str | None = None
        self.best: str | None = None
        self.patience: str | None = None
        self.messages: deque[str] = deque(maxlen=5)
        self._live: Live | None = None
        self._last_plain_step = -1
        self._held_step: int | None = None  # a plain progress line waiting for its step's own loss
        self._step_loss: dict[int, float] = {}  # recent steps' own losses, for the plain lines
        self.status: str | None = None  # what the run is waiting for (shown live; plain: when it changes)
        self.status_detail = ""

    # --- lifecycle -------------------------------------------------------------------------------------
    def __enter__(self) -> LiveView:
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self._live.update(self._render())
            self._live.__exit__(None, None, None)
            self._live = None

    def refresh(self) -> None:
        if self._live:
            self._live.update(self._render())

    # --- inputs ----------------------------------------------------------------------------------------
    def progress(self, step: int, total: int | None, loss: float | None, rate: float | None,
                 loss_step: int | None = None) -> None:
        """One redraw of the trainer's bar. `loss_step`: the step `loss` belongs to when not `step` (kohya
        first draws a new step with the previous step's loss)."""
        loss_step = step if loss_step is None else loss_step
        self.step, self.total, self.rate = step, total, rate
        if loss is not None:
            self.loss, self.loss_step = loss, loss_step
            self._step_loss[loss_step] = loss
            for old in [s for s in self._step_loss if s < loss_step - 1]:
                del self._step_loss[old]
        if not self.live_mode:
            self._plain_progress(step, total)

    def _plain_progress(self, step: int, total: int | None) -> None:
        """A line every 10 % of the run (every step for short runs), not every redraw, each with its own
        step's loss: a due step's line waits for that loss, or until a later step shows it will not come."""
        held = self._held_step
        if held is not None and (held < step or held in self._step_loss):
            self._plain_step(held, total)
        every = max(1, (total or 10) // 10)
        due = step >= 1 and (step % every == 0 or step == total)
        if due and step > self._last_plain_step and step != self._held_step:
            if step in self._step_loss:
                self._plain_step(step, total)
            else:
                self._held_step = step

    def _plain_step(self, step: int, total: int | None) -> None:
        self._held_step = None
        self._last_plain_step = step
        loss = self._step_loss.get(step)
        loss_text = f" loss {loss:.4g}" if loss is not None else ""
        self._plain(f"step {step}/{total or '?'}{loss_text}")

    def set_epoch(self, epoch: int, total: int) -> None:
        self.epoch = f"{epoch}/{total}"
        self._plain(f"epoch {epoch}/{total}")

    def set_queue(self, pending: list[str], busy: str | None) -> None:
        self.queue, self.busy = pending, busy

    def set_status(self, text: str | None, detail: str = "") -> None:
        """A line saying what the run waits for, replaced as it changes. `detail` (a countdown) changes at
        every refresh: the live line shows it; a plain line is printed only when `text` changes."""
        if text and text != self.status:
            self._plain(f"{text} ({detail})" if detail else text)
        self.status, self.status_detail = text, detail

    def _step_of(self, row: dict[str, Any]) -> int | None:
        try:
            return int(row["step"]) if row.get("step") not in (None, "") else None
        except (TypeError, ValueError):
            return None

    def previous(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The ok row of the largest step below `row`'s (None: no step, or none evaluated below it)."""
        step = self._step_of(row)
        below = [s for s in self.ok_rows if step is not None and s < step]
        return self.ok_rows[max(below)] if below else None

    def add_row(self, row: dict[str, Any]) -> None:
        step = self._step_of(row)
        if row.get("status") == BASELINE:
            self.baseline = dict(row)
            values = ", ".join(f"{SHORT[k]} {_fmt(k, v)}" for k in SHOWN if (v := _num(row.get(k))) is not None)
            self._plain(f"baseline (base model, no LoRA): {values}")
            return
        if row.get("status") == "ok" and step is not None:
            self.ok_rows[step] = row
        self.rows.append(dict(row))
        previous = self.previous(row)
        if row.get("status") in ("failed", "skipped"):
            status = row["status"].upper()
            self._plain(f"checkpoint {row['checkpoint']} (step {row.get('step')}): {status} - {row.get('note')}")
        else:
            parts = []
            for key in SHOWN:
                value = _num(row.get(key))
                if value is not None:
                    parts.append(f"{SHORT[key]} {_fmt(key, value)}{self._delta(key, value, previous)}")
            note = f" ({row['note']})" if row.get("note") else ""
            versus = f"; changes vs step {previous['step']}" if previous else ""
            base = self.versus_baseline(row)
            base = f"; vs baseline: {base}" if base else ""
            self._plain(f"checkpoint {row['checkpoint']} step {row.get('step')}: {', '.join(parts)}{note}{versus}"
                        f"{base}")

    def versus_baseline(self, row: dict[str, Any]) -> str:
        """Each metric's change from the base model's value ("" without a baseline row)."""
        if self.baseline is None:
            return ""
        parts = []
        for key in SHOWN:
            value, before = _num(row.get(key)), _num(self.baseline.get(key))
            if value is not None and before is not None:
                parts.append(f"{SHORT[key]} {_fmt(key, value - before, '+')}")
        return ", ".join(parts)

    def set_best(self, text: str | None) -> None:
        if text and text != self.best:
            self._plain(f"best: {text}")
        self.best = text

    def set_patience(self, text: str | None) -> None:
        self.patience = text

    def message(self, text: str) -> None:
        self.messages.append(text)
        self._plain(text)

    # --- rendering -------------------------------------------------------------------------------------
    def _plain(self, text: str) -> None:
        if self.live_mode and self._live:
            self.refresh()
            return
        print(f"[lora-monitor] {text}", file=self.stream, flush=True)

    @staticmethod
    def _delta(key: str, value: float, previous: dict[str, Any] | None) -> str:
        before = _num(previous.get(key)) if previous else None
        return f" ({_fmt(key, value - before, '+')})" if before is not None else ""

    def _progress_text(self) -> Text:
        total = self.total or 0
        width = 30
        filled = int(width * self.step / total) if total else 0
        bar = "█" * filled + "░" * (width - filled)
        eta = ""
        if self.rate and total:
            eta = f"  ETA {int((total - self.step) / self.rate)}s"
        rate = f"  {self.rate:.2f} it/s" if self.rate else ""
        loss = ""
        if self.loss is not None:
            of = f" (step {self.loss_step})" if self.loss_step != self.step else ""
            loss = f"  loss {self.loss:.4g}{of}"
        epoch = f"  epoch {self.epoch}" if self.epoch else ""
        return Text(f"train {bar} {self.step}/{total or '?'}{rate}{eta}{loss}{epoch}")

    def _table(self) -> Table:
        table = Table(title="evaluated checkpoints, by step (change: vs the preceding evaluated step)", expand=False)
        for name in ("step", "checkpoint", *[SHORT[k] for k in SHOWN], EVAL_SECONDS_HEADER):
            table.add_column(name, justify="right" if name != "checkpoint" else "left")
        order = sorted(range(len(self.rows)), key=lambda i: (self._step_of(self.rows[i]) is None,
                                                              self._step_of(self.rows[i]) or 0, i))
        if self.baseline is not None:
            cells = [_fmt(k, v) if (v := _num(self.baseline.get(k))) is not None else "" for k in SHOWN]
            table.add_row("0", Text("baseline (no LoRA)", "cyan"), *cells, str(self.baseline.get("eval_seconds") or ""))
        for row in (self.rows[i] for i in order):
            if row.get("status") in ("failed", "skipped"):
                table.add_row(str(row.get("step") or ""), row["checkpoint"], Text(str(row.get("note")), "red"))
                continue
            previous = self.previous(row)
            cells = []
            for key in SHOWN:
                value = _num(row.get(key))
                cells.append("" if value is None else f"{_fmt(key, value)}{self._delta(key, value, previous)}")
            name = Text(row["checkpoint"])
            if row.get("status") == "duplicate":  # kohya saved these weights twice: not generated again
                name.append(f" (duplicate: {str(row.get('note') or '').split(';')[0]})", "dim")
            table.add_row(str(row.get("step") or ""), name, *cells, str(row.get("eval_seconds") or ""))
        return table

    def _render(self) -> Group:
        parts: list[Any] = [self._progress_text(), self._table()]
        latest = max(self.ok_rows) if self.ok_rows else None
        if latest is not None and (base := self.versus_baseline(self.ok_rows[latest])):
            parts.append(Text(f"step {latest} vs baseline: {base}"))
        queue = ", ".join(self.queue) if self.queue else "empty"
        busy = f"evaluating {self.busy}; " if self.busy else ""
        parts.append(Text(f"eval queue: {busy}{queue}"))
        if self.status:
            parts.append(Text(f"{self.status} ({self.status_detail})" if self.status_detail else self.status,
                              "yellow"))
        if self.best:
            parts.append(Text(f"best: {self.best}", "green"))
        if self.patience:
            parts.append(Text(f"early stop: {self.patience}", "yellow"))
        gpu = _gpu_memory()
        if gpu:
            parts.append(Text(gpu))
        parts.extend(Text(m, "dim") for m in self.messages)
        return Group(*parts)


def _gpu_memory() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            used = torch.cuda.memory_allocated() / 2**30
            peak = torch.cuda.max_memory_allocated() / 2**30
            return f"GPU memory (evaluator): {used:.2f} GiB, peak {peak:.2f} GiB"
    except Exception:  # noqa: BLE001 - the view must never fail the run
        return None
    return None
