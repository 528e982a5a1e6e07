"""kohya.log: everything kohya printed, as it came, appended per launch in kohya's output folder."""

from __future__ import annotations

import os
import shlex
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

CONSOLE_LOG_NAME = "kohya.log"  # in kohya's output_dir: everything kohya printed, as it came


class ConsoleLog:
    """kohya's output kept as it came (bytes, tqdm's carriage returns included) in one file, appended per launch.

    The reader threads write each chunk as soon as they read it, unbuffered, so what kohya printed is on disk
    even when the monitor is killed (-9). stdout and stderr chunks interleave in the order they were read, as
    a terminal would show them. A failed write stops the log (once) and never stops training.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self._lock = threading.Lock()
        self.error: str | None = None

    @classmethod
    def open(cls, path: Path, argv: list[str], cwd: Path) -> ConsoleLog:
        """Open for appending and write the launch's header line; raises OSError and then leaves no file
        behind that it created."""
        existed = path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        header = f"==== {_now()} lora-monitor started kohya in {cwd}: {shlex.join(argv)}\n"
        try:
            os.write(fd, header.encode("utf-8", errors="replace"))
        except OSError:
            os.close(fd)
            if not existed:
                path.unlink(missing_ok=True)
            raise
        return cls(path, fd)

    def write(self, data: bytes) -> str | None:
        """Append `data`; returns the reason the first time writing fails (the log is closed then)."""
        with self._lock:  # one writer at a time, and none after close()
            if self._fd is None or not data:
                return None
            try:
                while data:
                    data = data[os.write(self._fd, data):]
                return None
            except OSError as exc:
                self._close()
                self.error = f"cannot write {self.path} ({exc.strerror or exc}); kohya's output is no longer kept"
                return self.error

    def close(self, footer: str | None = None) -> None:
        if footer:
            self.write(f"==== {_now()} {footer}\n".encode())
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")
