"""One monitor per output folder: a lock file holding the owner's pid; a stale lock (dead pid) is taken over."""

from __future__ import annotations

import os
from pathlib import Path

from lora_monitor.errors import UserError

LOCK_NAME = ".lora-monitor.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self._held = False

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise UserError(f"{self.path.parent}: output folder is a file; point output_dir at a folder") from None
        except OSError as exc:
            raise UserError(f"{self.path.parent}: cannot create the output folder ({exc.strerror})") from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _alive(owner):
                    raise UserError(
                        f"{self.path.parent}: another lora-monitor (pid {owner}) is already working on this folder; "
                        "wait for it or stop it"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            except OSError as exc:
                raise UserError(
                    f"{self.path.parent}: cannot write in the output folder ({exc.strerror}); check permissions"
                ) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            self._held = True
            return
        raise UserError(f"{self.path}: could not take the lock; remove the file if no monitor is running")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def release(self) -> None:
        if self._held and self._owner() == os.getpid():
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
