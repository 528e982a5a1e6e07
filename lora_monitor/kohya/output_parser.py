"""Turn kohya sd-scripts' console output into events: progress, epochs, saves, log records, tracebacks.

What the output looks like (captured from a real run, tests/fixtures/kohya/):
- stdout: `print` lines: the run header (`total optimization steps / ...: N`), `epoch n/N`,
  `saving checkpoint: PATH` (printed *before* the file is written), `removing old checkpoint: PATH`.
- stderr: tqdm bars redrawn with `\\r` (`steps:  33%|###| 2/6 [00:56<01:52, 28.04s/it, avr_loss=1.06]`),
  rich log records (`2026-11-26 21:15:00 INFO     message      file.py:26`) wrapped onto continuation lines
  at the console width, Python warnings and tracebacks. A log record often follows a bar with no newline
  in between, so a segment can be "bar + log line".
- For step N the bar first shows `N/T` with the previous `avr_loss`, then, after any save, `N/T` again with
  the updated one: the step's loss is the last value shown with `N/T`.

The parser is fed text in arbitrary chunks (a chunk may end mid-line) per stream; each stream keeps its own
partial line and multi-line state, because stdout and stderr arrive through separate pipes.
Not thread-safe: the caller serialises `feed` and `flush`.
"""

from __future__ import annotations

import re
import unicodedata
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from lora_monitor.events import (
    CheckpointRemoved,
    CheckpointSaving,
    EpochStarted,
    TotalSteps,
    TrainerLog,
    TrainProgress,
)

LAST_LINES = 20
# A partial line longer than this is processed as complete: a stream without newlines cannot grow memory.
MAX_PARTIAL = 1 << 16

# CSI sequences (colours, cursor moves such as tqdm's `ESC[A`), OSC sequences and two-byte escapes.
ANSI_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
SPLIT_RE = re.compile(r"[\r\n]")
# tqdm's default format: '{desc}: {percentage}%|{bar}| {n}/{total} [{elapsed}<{remaining}, {rate}{postfix}]'.
# The bracket never contains ']' before its end, so a match always covers the whole bar.
BAR_RE = re.compile(
    r"(?:(?P<desc>[^\r\n|]*?): )?\s*(?P<pct>\d{1,3})%\|[^|]*\|"
    r"\s*(?P<n>\d+)/(?P<total>\d+)\s*\[(?P<info>[^\]]*)\]"
)
RATE_RE = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>s/it|it/s)")
LOSS_RE = re.compile(r"\bavr_loss=(?P<loss>[^,\s\]]+)")
TRAIN_BAR_DESC = "steps"  # kohya's training bar; "validation steps" and unnamed bars are someone else's

TOTAL_RE = re.compile(r"total optimization steps\b[^:]*:\s*(?P<total>\d+)\s*$")
EPOCH_RE = re.compile(r"^epoch (?P<epoch>\d+)/(?P<total>\d+)$")
SAVING_RE = re.compile(r"^saving checkpoint: (?P<path>.+)$")
REMOVING_RE = re.compile(r"^removing old checkpoint: (?P<path>.+)$")
TRACEBACK_START = "Traceback (most recent call last):"
FRAME_RE = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$')
PY_WARNING_RE = re.compile(r"^(?P<where>\S.*?):(?P<line>\d+): (?P<category>\w*Warning): (?P<message>.*)$")
PLAIN_WARNING_RE = re.compile(r"^(?:warning|\w+Warning)\b[:\s]", re.IGNORECASE)
PLAIN_ERROR_RE = re.compile(r"^(?:error|\w+Error)\b:", re.IGNORECASE)
# rich's log record: time column (kohya's datefmt, rich's default `[%x %X]`, blank when the second repeats),
# level column, message, then the source column `file.py:123` at the right edge.
LOG_HEAD_RE = re.compile(
    r"^\s*(?P<time>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}|\[[\d/:\-. ]+\])?\s*"
    r"(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) +(?P<msg>\S.*?)?(?:\s+(?P<src>[\w.<>-]+\.py:\d+))?\s*$"
)
LEVELS = {"DEBUG": "info", "INFO": "info", "WARNING": "warning", "ERROR": "error", "CRITICAL": "error"}
LIBRARY_PARTS = ("site-packages", "dist-packages", "/lib/python")


def strip_ansi(text: str) -> str:
    return ANSI_RE.sub("", text) if "\x1b" in text else text


def _cells(text: str) -> int:
    """Terminal cells `text` takes (East Asian wide characters take two), as rich counts them."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _is_wide(char: str) -> bool:
    return unicodedata.east_asian_width(char) in "WF"


@dataclass
class _Record:
    """A rich log record being assembled from its head line and continuation lines."""

    level: str
    msg_col: int  # character column where the message starts on every line of the record
    width: int | None  # cells of the message column (None when the source column is absent)
    text: str = ""
    last_piece: str = ""  # the message part of the latest line

    def add(self, raw: str) -> None:
        """Append one line's message column (`raw` keeps its indentation)."""
        piece, last = raw.strip(), self.last_piece
        if not piece:
            return
        # rich wraps at spaces; a word (with the indentation before it) wider than the column goes onto
        # lines of its own, cut at the column's edge (a "fold"): such a line is one full-width run without
        # inner spaces. CJK text is wrapped anywhere.
        folded = bool(last.strip()) and (
            (self.width is not None and _cells(last) >= self.width and " " not in last.strip())
            or (_is_wide(last[-1]) and _is_wide(piece[0]))
        )
        self.text = self.text + ("" if folded or not self.text else " ") + piece
        self.last_piece = raw.rstrip()


@dataclass
class _Stream:
    partial: str = ""  # the incomplete last segment
    eager_bar: str | None = None  # a complete bar at the start of `partial`, already reported
    record: _Record | None = None
    traceback: list[str] | None = None
    after_py_warning: bool = False  # the indented source line Python prints after a warning
    level_col: int = 20  # where rich's level column starts: the time column's width + 1


class KohyaOutputParser:
    """Incremental parser of kohya's stdout/stderr; see the module docstring for the formats.

    State (read it between `feed` calls):
    - `total_steps`: from the run header, else from the training bar's total.
    - `current_step`: the step count of the latest training-bar redraw (0 before the first step).
    - `loss_at_step`: step -> the last `avr_loss` shown with that step count (3 significant digits, a moving
      average over one epoch's batches).
    - `epoch_at_step`: step -> the 1-based epoch in force when the step was first drawn.
    - `current_epoch`, `epochs_total`: from `epoch n/N` lines.
    - `last_lines`: the last 20 complete lines that are not progress bars, ANSI-stripped, right-stripped.
    """

    def __init__(self) -> None:
        self.total_steps: int | None = None
        self.current_step: int | None = None
        self.current_epoch: int | None = None
        self.epochs_total: int | None = None
        self.loss_at_step: dict[int, float] = {}
        self.epoch_at_step: dict[int, int] = {}
        self.last_lines: deque[str] = deque(maxlen=LAST_LINES)
        self._streams: dict[str, _Stream] = {}

    def feed(self, data: str, stream: str) -> list[object]:
        """Parse a chunk of `stream` ("stdout" or "stderr"); returns the events it completed, in order."""
        st = self._streams.setdefault(stream, _Stream())
        parts = SPLIT_RE.split(data)  # not partial + data: a long line arriving in small chunks stays linear
        parts[0] = st.partial + parts[0]
        st.partial = parts.pop()
        out: list[object] = []
        for segment in parts:
            self._segment(segment, st, stream, out)
        if len(st.partial) > MAX_PARTIAL:
            self._segment(st.partial, st, stream, out)
            st.partial = ""
        self._eager_bar(st, stream, out)
        return out

    def flush(self) -> list[object]:
        """End of output: finish partial lines, open log records and tracebacks."""
        out: list[object] = []
        for stream, st in self._streams.items():
            if st.partial:
                self._segment(st.partial, st, stream, out)
                st.partial = ""
            self._close_record(st, stream, out)
            self._close_traceback(st, stream, out)
        return out

    # -- segments -------------------------------------------------------------------------------

    def _eager_bar(self, st: _Stream, stream: str, out: list[object]) -> None:
        """Report a bar still waiting for its terminator: tqdm's next `\\r` may come with the next step."""
        if "%|" not in st.partial:  # cheap test first: this runs after every chunk, on a growing line
            return
        tail = strip_ansi(st.partial)
        if st.eager_bar is not None and tail.startswith(st.eager_bar):
            return
        match = BAR_RE.match(tail)
        if match:
            st.eager_bar = match.group(0)
            self._bar(match, st, stream, out)

    def _segment(self, raw: str, st: _Stream, stream: str, out: list[object]) -> None:
        line = strip_ansi(raw)
        eager, st.eager_bar = st.eager_bar, None
        if eager is not None and line.startswith(eager):
            rest = line[len(eager):]
        else:
            match = BAR_RE.match(line)
            if match is None:
                self._line(line, st, stream, out)
                return
            self._bar(match, st, stream, out)
            rest = line[match.end():]
        if rest.strip():  # a log line glued to the bar
            self._line(rest, st, stream, out)

    def _bar(self, match: re.Match[str], st: _Stream, stream: str, out: list[object]) -> None:
        self._close_record(st, stream, out)
        if (match.group("desc") or "").strip() != TRAIN_BAR_DESC:
            return
        step, total = int(match.group("n")), int(match.group("total"))
        info = match.group("info")
        loss = _float(LOSS_RE.search(info), "loss")
        rate_match = RATE_RE.search(info)
        rate = None
        if rate_match:
            value = float(rate_match.group("value"))
            rate = value if rate_match.group("unit") == "it/s" else (1.0 / value if value > 0 else None)
        if self.total_steps is None:
            self.total_steps = total
            out.append(TotalSteps(total))
        self.current_step = step
        if step >= 1:
            if self.current_epoch is not None:
                self.epoch_at_step.setdefault(step, self.current_epoch)
            if loss is not None:
                self.loss_at_step[step] = loss
        out.append(TrainProgress(step=step, total=total, loss=loss, rate=rate, epoch=self.current_epoch))

    # -- lines ----------------------------------------------------------------------------------

    def _line(self, line: str, st: _Stream, stream: str, out: list[object]) -> None:
        text = line.rstrip()
        if not text.strip():
            return  # blank lines separate nothing in rich's output; they never end a record
        self.last_lines.append(text)
        if st.traceback is not None:
            st.traceback.append(text)
            if not text[0].isspace():  # the exception line ends the traceback
                self._close_traceback(st, stream, out)
            return
        if text.strip() == TRACEBACK_START:
            self._close_record(st, stream, out)
            st.traceback = [text.strip()]
            return
        record = st.record
        if record is not None and len(text) > record.msg_col and not text[: record.msg_col].strip():
            record.add(text[record.msg_col:])
            return
        self._close_record(st, stream, out)
        head = LOG_HEAD_RE.match(text)
        if head:
            st.record = _record_of(head, text, st)
            return
        if st.after_py_warning and text[0].isspace():
            st.after_py_warning = False
            return
        st.after_py_warning = False
        self._plain(text.strip(), st, stream, out)

    def _plain(self, text: str, st: _Stream, stream: str, out: list[object]) -> None:
        if m := TOTAL_RE.search(text):
            total = int(m.group("total"))
            if total != self.total_steps:
                self.total_steps = total
                out.append(TotalSteps(total))
        elif m := EPOCH_RE.match(text):
            self.current_epoch, self.epochs_total = int(m.group("epoch")), int(m.group("total"))
            out.append(EpochStarted(self.current_epoch, self.epochs_total))
        elif m := SAVING_RE.match(text):
            out.append(CheckpointSaving(Path(m.group("path"))))
        elif m := REMOVING_RE.match(text):
            out.append(CheckpointRemoved(Path(m.group("path"))))
        elif m := PY_WARNING_RE.match(text):
            st.after_py_warning = True
            out.append(TrainerLog(f"{m.group('category')}: {m.group('message')}", "warning", stream))
        elif PLAIN_WARNING_RE.match(text):
            out.append(TrainerLog(text, "warning", stream))
        elif PLAIN_ERROR_RE.match(text):
            out.append(TrainerLog(text, "error", stream))
        else:
            out.append(TrainerLog(text, "info", stream))

    def _close_record(self, st: _Stream, stream: str, out: list[object]) -> None:
        if st.record is not None:
            out.append(TrainerLog(st.record.text, st.record.level, stream))
            st.record = None

    def _close_traceback(self, st: _Stream, stream: str, out: list[object]) -> None:
        if st.traceback is not None:
            out.append(TrainerLog(_summarise_traceback(st.traceback), "error", stream))
            st.traceback = None


def _float(match: re.Match[str] | None, group: str) -> float | None:
    if match is None:
        return None
    try:
        return float(match.group(group))
    except ValueError:
        return None


def _record_of(head: re.Match[str], line: str, st: _Stream) -> _Record:
    """A record from its head line. Continuation lines put the message where the head line would without the
    spaces tqdm pads a bar with when a record is glued to it; so measure from the time column (or, when the
    time is blank, from the level column of the stream's last timed record)."""
    msg = head.group("msg") or ""
    if head.group("time"):
        st.level_col = head.start("level") - head.start("time")
    msg_start = head.start("msg") if head.group("msg") else head.end("level") + 1
    msg_col = st.level_col + msg_start - head.start("level")
    width = None
    if head.group("src"):
        width = _cells(line[: head.start("src")]) - 1 - _cells(line[:msg_start])
    record = _Record(level=LEVELS[head.group("level")], msg_col=msg_col, width=width)
    record.add(msg.strip())
    return record


def _summarise_traceback(lines: list[str]) -> str:
    """One line: the exception, and where it was raised (the innermost frame outside installed packages)."""
    complete = len(lines) > 1 and not lines[-1][0].isspace()
    exception = lines[-1].strip() if complete else "traceback (incomplete)"
    frames = [m for m in (FRAME_RE.match(line) for line in lines) if m]
    if not frames:
        return exception
    own = [m for m in frames if not any(part in m.group("file") for part in LIBRARY_PARTS)]
    frame = (own or frames)[-1]
    return f"{exception} (in {frame.group('func')}, {frame.group('file')}:{frame.group('line')})"
