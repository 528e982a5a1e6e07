"""The watcher hands over a file only when it is completely written, once, and skips deleted ones."""

import threading
import time
from pathlib import Path

from lora_monitor.checkpoints.watcher import CheckpointWatcher, list_checkpoints
from tests.checkpoints.test_files import kohya_lora


def _wait(cond, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_file_written_slowly_in_place_is_handed_over_once(tmp_path: Path) -> None:
    full = kohya_lora(tmp_path / "src.safetensors").read_bytes()
    out = tmp_path / "out"
    ready: list[Path] = []
    lock = threading.Lock()

    def on_ready(p: Path) -> None:
        with lock:
            ready.append(p)

    w = CheckpointWatcher(out, on_ready, settle_s=0.2)
    w.start()
    target = out / "lora-step00000002.safetensors"
    with open(target, "wb") as fh:  # like kohya: in place, in pieces, over ~1 s
        for i in range(0, len(full), max(1, len(full) // 8)):
            fh.write(full[i : i + max(1, len(full) // 8)])
            fh.flush()
            time.sleep(0.12)
            assert not ready, "handed over before the file was complete"
    assert _wait(lambda: len(ready) == 1)
    (out / "lora-best.safetensors").write_bytes(full)  # our own file: ignored
    (out / "notes.txt").write_text("x")
    time.sleep(0.8)
    w.stop()
    assert ready == [target]


def test_deleted_before_complete_is_reported(tmp_path: Path) -> None:
    removed: list[Path] = []
    w = CheckpointWatcher(tmp_path, lambda p: None, removed.append, settle_s=0.2)
    w.start()
    f = tmp_path / "x-step00000004.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a header promising more
    time.sleep(0.4)
    f.unlink()
    assert _wait(lambda: removed == [f])
    w.stop()


def test_existing_files_and_ignore(tmp_path: Path) -> None:
    a = kohya_lora(tmp_path / "a-step00000002.safetensors")
    kohya_lora(tmp_path / "a-step00000004.safetensors")
    assert [p.name for p in list_checkpoints(tmp_path)] == [a.name, "a-step00000004.safetensors"]
    got: list[Path] = []
    w = CheckpointWatcher(tmp_path, got.append, settle_s=0.1, ignore={a.name})
    w.start()
    assert _wait(lambda: len(got) == 1)
    w.stop()
    assert got[0].name == "a-step00000004.safetensors"
