"""Best checkpoint: selection table, atomic publication, copy fallback, failures that keep the old pair."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

from lora_monitor.policies import best_checkpoint
from lora_monitor.policies.best_checkpoint import (
    BEST_JSON,
    atomic_write_bytes,
    best_file_name,
    select_best,
    write_best,
)


def row(ckpt: str, step: Any, status: str = "ok", **metrics: Any) -> dict[str, Any]:
    return {"checkpoint": ckpt, "step": step, "status": status, **metrics}


ROWS = [
    row("a-step00000010.safetensors", "10", eval_score="0.50", clip_t="0.20"),
    row("a-step00000020.safetensors", "20", eval_score="0.30", clip_t="0.31"),
    row("a-step00000030.safetensors", "30", status="failed", eval_score="0.10", clip_t="0.90"),
    row("a-step00000040.safetensors", "40", eval_score="", clip_t="0.25"),
    row("a-step00000050.safetensors", "50", eval_score="0.40", clip_t="0.29"),
]


@pytest.mark.parametrize(
    ("rows", "monitor", "mode", "expected"),
    [
        (ROWS, "eval_score", "min", "a-step00000020.safetensors"),
        (ROWS, "eval_score", "max", "a-step00000010.safetensors"),
        (ROWS, "clip_t", "max", "a-step00000020.safetensors"),
        (ROWS, "clip_t", "min", "a-step00000010.safetensors"),
        ([], "eval_score", "min", None),
        ([r for r in ROWS if r["step"] in ("30", "40")], "eval_score", "min", None),
        ([row("x", 20, eval_score=0.3), row("y", 10, eval_score=0.3)], "eval_score", "min", "y"),
        ([row("x", 10, eval_score=0.3), row("y", 10, eval_score=0.3)], "eval_score", "min", "x"),
        ([row("x", None, eval_score=0.3), row("y", 5, eval_score=0.3)], "eval_score", "min", "y"),
        ([row("x", 10, eval_score="nan"), row("y", 20, eval_score=0.9)], "eval_score", "min", "y"),
        ([row("x", 10, eval_score="inf"), row("y", 20, eval_score="-inf")], "eval_score", "min", None),
        (
            [row("x", 10, status="duplicate", eval_score=0.1), row("y", 20, eval_score=0.9)],
            "eval_score",
            "min",
            "y",
        ),
        ([row("x", 10, eval_score=0.1)], "no_such_metric", "min", None),
    ],
)
def test_select_best(rows: list[dict[str, Any]], monitor: str, mode: str, expected: str | None) -> None:
    best = select_best(rows, monitor, mode)
    assert (best["checkpoint"] if best else None) == expected


def test_select_best_rejects_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        select_best(ROWS, "eval_score", "lowest")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    for step in (10, 20, 30):
        (tmp_path / f"a-step{step:08d}.safetensors").write_bytes(f"weights of step {step}".encode() * 100)
    return tmp_path


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / f"a-step{step:08d}.safetensors"


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_best_publishes_link_and_json(run_dir: Path) -> None:
    best = row(
        "a-step00000020.safetensors", "20", eval_score="0.3", clip_t="0.31", epoch="2", note="", lpips="0.7"
    )
    write_best(run_dir, best_file_name("a"), best, "lowest eval_score", ckpt(run_dir, 20))
    target = run_dir / best_file_name("a")
    assert target.name == "a-best.safetensors"
    assert target.read_bytes() == ckpt(run_dir, 20).read_bytes()
    assert os.path.samefile(target, ckpt(run_dir, 20))  # hard link on the same file system
    record = json.loads((run_dir / BEST_JSON).read_text())
    assert record["checkpoint"] == "a-step00000020.safetensors"
    assert record["step"] == 20 and record["epoch"] == 2
    assert record["metrics"] == {"eval_score": 0.3, "clip_t": 0.31, "lpips": 0.7}
    assert record["rule"] == "lowest eval_score"
    assert leftovers(run_dir) == []


def test_replacing_best_keeps_old_checkpoint_intact(run_dir: Path) -> None:
    old_bytes = ckpt(run_dir, 10).read_bytes()
    write_best(run_dir, best_file_name("a"), row("a-step00000010.safetensors", 10), "r", ckpt(run_dir, 10))
    write_best(run_dir, best_file_name("a"), row("a-step00000030.safetensors", 30), "r", ckpt(run_dir, 30))
    assert ckpt(run_dir, 10).read_bytes() == old_bytes
    assert (run_dir / "a-best.safetensors").read_bytes() == ckpt(run_dir, 30).read_bytes()
    assert json.loads((run_dir / BEST_JSON).read_text())["step"] == 30


def test_same_checkpoint_twice_leaves_no_temp(run_dir: Path) -> None:
    for rule in ("first", "second"):
        write_best(run_dir, best_file_name("a"), row("a-step00000020.safetensors", 20), rule, ckpt(run_dir, 20))
    assert json.loads((run_dir / BEST_JSON).read_text())["rule"] == "second"
    assert leftovers(run_dir) == []


def test_copy_fallback_when_hard_links_fail(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src: Path, dst: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(best_checkpoint.os, "link", no_link)
    write_best(run_dir, best_file_name("a"), row("a-step00000020.safetensors", 20), "r", ckpt(run_dir, 20))
    target = run_dir / "a-best.safetensors"
    assert target.read_bytes() == ckpt(run_dir, 20).read_bytes()
    assert not os.path.samefile(target, ckpt(run_dir, 20))
    assert leftovers(run_dir) == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_copy_keeps_old_pair(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_best(run_dir, best_file_name("a"), row("a-step00000010.safetensors", 10), "r", ckpt(run_dir, 10))
    before = snapshot(run_dir)

    def no_link(src: Path, dst: Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    def half_copy(src: Path, dst: Path) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[:50])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(best_checkpoint.os, "link", no_link)
    monkeypatch.setattr(best_checkpoint.shutil, "copyfile", half_copy)
    with pytest.raises(OSError, match="No space"):
        write_best(run_dir, best_file_name("a"), row("a-step00000030.safetensors", 30), "r", ckpt(run_dir, 30))
    assert snapshot(run_dir) == before


def test_failed_rename_keeps_old_pair(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_best(run_dir, best_file_name("a"), row("a-step00000010.safetensors", 10), "r", ckpt(run_dir, 10))
    before = snapshot(run_dir)

    def broken_replace(src: Path, dst: Path) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(best_checkpoint.os, "replace", broken_replace)
    with pytest.raises(OSError, match="I/O error"):
        write_best(run_dir, best_file_name("a"), row("a-step00000030.safetensors", 30), "r", ckpt(run_dir, 30))
    assert snapshot(run_dir) == before


def test_missing_checkpoint_raises_and_keeps_old_pair(run_dir: Path) -> None:
    write_best(run_dir, best_file_name("a"), row("a-step00000010.safetensors", 10), "r", ckpt(run_dir, 10))
    before = snapshot(run_dir)
    with pytest.raises(FileNotFoundError):
        write_best(run_dir, best_file_name("a"), row("gone.safetensors", 99), "r", run_dir / "gone.safetensors")
    assert snapshot(run_dir) == before


def test_atomic_write_bytes(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert leftovers(tmp_path) == []
