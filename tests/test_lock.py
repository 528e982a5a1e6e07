"""One monitor per output folder; stale locks are taken over."""

import os
from pathlib import Path

import pytest

from lora_monitor.errors import UserError
from lora_monitor.lock import LOCK_NAME, OutputLock


def test_second_monitor_refused(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("1\n")  # pid 1 is always alive
    with pytest.raises(UserError, match="another lora-monitor \\(pid 1\\)"):
        OutputLock(tmp_path).acquire()


def test_stale_lock_taken_over_and_released(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("999999999\n")
    with OutputLock(tmp_path):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


def test_output_folder_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        OutputLock(f).acquire()


def test_read_only_folder_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only output folder (root ignores permission bits, so EROFS is injected)."""
    import errno

    from lora_monitor import lock as lock_mod

    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(lock_mod.os, "open", refuse)
    with pytest.raises(UserError, match="cannot write in the output folder \\(Read-only file system\\)"):
        OutputLock(tmp_path).acquire()
    assert list(tmp_path.iterdir()) == []
