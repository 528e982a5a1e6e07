"""Checkpoint watcher: hands over each LoRA file once it is completely written.

kohya writes its files in place (no temp name), so a file is handed over only when its safetensors header
accounts for its whole size and the size has stopped changing for `settle_s`. watchdog's events (inotify
CLOSE_WRITE on Linux) wake the check early; a periodic rescan catches anything an event missed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from lora_monitor.checkpoints.files import is_complete

OWN_SUFFIXES = ("-best",)  # files lora-monitor itself writes into the output folder


def is_candidate(path: Path) -> bool:
    return path.suffix == ".safetensors" and not path.stem.endswith(OWN_SUFFIXES) and not path.name.startswith(".")


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete LoRA files now in `folder` (not recursive: kohya saves flat into output_dir)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_candidate(p) and is_complete(p))


class _Handler(FileSystemEventHandler):
    def __init__(self, wake: Callable[[Path], None]) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        for attr in ("src_path", "dest_path"):
            raw = getattr(event, attr, "")
            if raw:
                path = Path(raw if isinstance(raw, str) else raw.decode())
                if is_candidate(path):
                    self._wake(path)


class CheckpointWatcher:
    """Calls `on_ready(path)` once for every complete LoRA file appearing in `folder`.

    Files already present at start() are reported too unless listed in `ignore`.
    `on_removed(path)` is called for a file that disappeared before it was complete.
    """

    def __init__(
        self,
        folder: Path,
        on_ready: Callable[[Path], None],
        on_removed: Callable[[Path], None] | None = None,
        settle_s: float = 0.5,
        rescan_s: float = 2.0,
        ignore: set[str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self._on_ready = on_ready
        self._on_removed = on_removed
        self._settle_s = settle_s
        self._rescan_s = rescan_s
        self._seen: set[str] = set(ignore or ())
        self._pending: dict[Path, tuple[int, float]] = {}  # path -> (last size, time it last changed)
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._observer: Observer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(_Handler(self._wake), str(self.folder), recursive=False)
        self._observer.start()
        self._rescan()
        self._thread = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching after one last check, so files completed just before stop are not lost."""
        self._stop.set()
        self._wakeup.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self._observer:
            self._observer.stop()
            self._observer.join(timeout=10)
        self._rescan()
        self._check(final=True)

    def _wake(self, path: Path) -> None:
        with self._lock:
            if path.name not in self._seen and path not in self._pending:
                self._pending[path] = (-1, time.monotonic())
        self._wakeup.set()

    def _rescan(self) -> None:
        if not self.folder.is_dir():
            return
        for path in self.folder.iterdir():
            if is_candidate(path):
                self._wake(path)

    def _run(self) -> None:
        last_scan = time.monotonic()
        while not self._stop.is_set():
            self._wakeup.wait(timeout=0.2)
            self._wakeup.clear()
            if time.monotonic() - last_scan > self._rescan_s:
                self._rescan()
                last_scan = time.monotonic()
            self._check(final=False)

    def _check(self, final: bool) -> None:
        with self._lock:
            items = list(self._pending.items())
        now = time.monotonic()
        for path, (last_size, changed_at) in items:
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                self._forget(path)
                if self._on_removed:
                    self._on_removed(path)
                continue
            if size != last_size:
                with self._lock:
                    self._pending[path] = (size, now)
                if not final:
                    continue
            settled = final or now - changed_at >= self._settle_s
            if settled and is_complete(path):
                self._forget(path)
                self._on_ready(path)

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._pending.pop(path, None)
            self._seen.add(path.name)
