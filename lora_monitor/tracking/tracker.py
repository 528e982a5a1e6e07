"""The CSV tracker: one row per evaluated checkpoint, flushed and fsynced as it is written.

Each row goes to disk in a single write() followed by fsync(), so `tail -f` shows it at once, a crash
loses nothing already written, and a failed write (disk full) is cut back so no half row remains.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from lora_monitor.columns import COLUMNS, PREVIOUS_COLUMNS
from lora_monitor.errors import UserError


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return repr(value)  # full precision: eval-dir must reproduce live rows to 1e-4
    return str(value)


def format_row(row: Mapping[str, Any], columns: tuple[str, ...] = COLUMNS) -> str:
    unknown = set(row) - set(columns)
    if unknown:  # a bug, not user input
        raise KeyError(f"unknown CSV columns: {sorted(unknown)}")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


class Tracker:
    """Append-only CSV of checkpoint evaluations.

    An existing file is continued when its header is ours (so eval-dir completes a crashed run);
    a CSV with any other header is refused, never overwritten.
    """

    def __init__(self, path: Path, columns: tuple[str, ...] = COLUMNS,
                 previous: tuple[str, ...] | None = PREVIOUS_COLUMNS) -> None:
        """`columns`: the header; `previous`: an older header this one extends (such a file is upgraded)."""
        self.path = Path(path)
        self.columns = columns
        self.previous = previous
        self.rows: list[dict[str, str]] = []
        if self.path.is_dir():
            raise UserError(f"{self.path}: CSV path is a folder; give a file path with --csv or [output] csv")
        if self.path.exists() and self.path.stat().st_size > 0:
            self._read_existing()
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserError(f"{self.path.parent}: cannot create the CSV folder ({exc.strerror})") from None
            self._append(",".join(self.columns) + "\n")

    def _read_existing(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{self.path}: cannot read the existing CSV ({exc}); move it away") from None
        reader = csv.reader(io.StringIO(text))
        header = next(reader, [])
        if self.previous is not None and tuple(header) == self.previous:
            text = self._upgrade(text)
            reader = csv.reader(io.StringIO(text))
            header = next(reader, [])
        if tuple(header) != self.columns:
            raise UserError(
                f"{self.path}: exists with a different header (not a lora-monitor CSV); "
                "it was left untouched - pass another path with --csv or move the file"
            )
        if not text.endswith("\n"):
            # A row cut short by a crash mid-write: drop the fragment so the file stays parseable.
            keep = text[: text.rfind("\n") + 1]
            with open(self.path, "r+b") as fh:
                fh.truncate(len(keep.encode("utf-8")))
                os.fsync(fh.fileno())
            reader = csv.reader(io.StringIO(keep))
            next(reader, None)
        self.rows = [dict(zip(self.columns, r, strict=False)) for r in reader if r]

    def _upgrade(self, text: str) -> str:
        """An older lora-monitor CSV: the same rows under today's header, the new cells empty. Written to a
        temporary file and renamed over the old one, so a crash leaves one or the other, never a mix."""
        rows = list(csv.reader(io.StringIO(text)))[1:]
        if rows and not text.endswith("\n"):
            rows = rows[:-1]  # a row cut short by a crash
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        pad = [""] * (len(self.columns) - len(self.previous or ()))
        writer.writerows(r + pad for r in rows if r)
        tmp = self.path.with_name(f".{self.path.name}.upgrade.tmp")
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                fh.write(buf.getvalue())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise UserError(f"{self.path}: cannot add the new columns to this older CSV ({exc.strerror}); "
                            "check the folder's permissions") from None
        return buf.getvalue()

    def _append(self, text: str) -> None:
        data = text.encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(
                f"{self.path}: cannot write the CSV ({exc.strerror}); check the folder's permissions"
            ) from None
        try:
            size = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(28, "short write")
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, size)  # no half-written row
                raise UserError(f"{self.path}: writing a row failed ({exc.strerror}); free disk space") from None
        finally:
            os.close(fd)

    def done(self) -> set[str]:
        """Checkpoint file names that already have a row (any status but failed)."""
        return {r["checkpoint"] for r in self.rows if r.get("status") != "failed"}

    def append(self, row: Mapping[str, Any]) -> dict[str, str]:
        line = format_row(row, self.columns)
        self._append(line)
        parsed = dict(zip(self.columns, next(csv.reader(io.StringIO(line))), strict=True))
        self.rows.append(parsed)
        return parsed

    def history(self, metric: str) -> list[tuple[int, float]]:
        """(step, value) of ok rows in the order they were evaluated."""
        out = []
        for r in self.rows:
            if r.get("status") in ("ok", "duplicate") and r.get(metric) and r.get("step"):
                out.append((int(r["step"]), float(r[metric])))
        return out
