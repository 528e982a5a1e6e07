"""Best checkpoint: selection tables (with over-training exclusions), atomic publication, copy fallback, failures
that keep the old pair."""

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
    choose_best,
    exclusions_text,
    select_best,
    write_best,
    write_no_best,
)
from lora_monitor.policies.overtraining import Bounds


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


# ------------------------------------------------------------------ the [best] rules over flagged rows
def scored(step: int, score: float, status: str = "ok", **cells: Any) -> dict[str, str]:
    return {"checkpoint": f"a-{step}.safetensors", "step": str(step), "status": status,
            "eval_score": str(score), **{k: str(v) for k, v in cells.items()}}


BASELINE_ROW = {"checkpoint": "baseline", "step": "0", "status": "baseline", "eval_score": "0.01",
                "diversity": "0.4", "clip_t_holdout": "0.3"}
# eval_score keeps falling while the LoRA memorises: the lowest score is the most over-trained checkpoint
TRAINING = [
    BASELINE_ROW,
    scored(100, 0.50, diversity=0.35),
    scored(200, 0.30, diversity=0.30),
    scored(300, 0.20, diversity=0.08),  # diversity down to a fifth
    scored(400, 0.10, diversity=0.05, copies=1),
]


@pytest.mark.parametrize(
    ("rows", "rule", "best", "excluded"),
    [
        (TRAINING, "not_overtrained", "a-200.safetensors", ["a-300.safetensors", "a-400.safetensors"]),
        (TRAINING, "lowest_score", "a-400.safetensors", []),
        (TRAINING[:3], "not_overtrained", "a-200.safetensors", []),
        ([BASELINE_ROW], "not_overtrained", None, []),  # the baseline is never a candidate
        ([BASELINE_ROW], "lowest_score", None, []),
        ([], "not_overtrained", None, []),
        # every checkpoint flagged: no best, and all of them listed
        ([BASELINE_ROW, TRAINING[3], TRAINING[4]], "not_overtrained", None,
         ["a-300.safetensors", "a-400.safetensors"]),
        # without a baseline only copies and val_loss can flag
        (TRAINING[1:], "not_overtrained", "a-300.safetensors", ["a-400.safetensors"]),
        # a flagged row without a score was no candidate, so it is not "excluded" either
        ([BASELINE_ROW, scored(100, 0.5), {**scored(200, 0.1, copies=3), "eval_score": ""}], "not_overtrained",
         "a-100.safetensors", []),
        # failed and duplicate rows are never the best; a duplicate is not listed twice
        ([BASELINE_ROW, scored(100, 0.5), scored(200, 0.1, "failed"), scored(300, 0.05, "duplicate", copies=1)],
         "not_overtrained", "a-100.safetensors", []),
        # excluded entries come by step, whatever the order the rows arrived in
        ([BASELINE_ROW, TRAINING[4], scored(50, 0.9), TRAINING[3]], "not_overtrained", "a-50.safetensors",
         ["a-300.safetensors", "a-400.safetensors"]),
    ],
)
def test_choose_best(rows: list[dict[str, str]], rule: str, best: str | None, excluded: list[str]) -> None:
    choice = choose_best(rows, rule)
    assert (choice.best["checkpoint"] if choice.best else None) == best
    assert [e["checkpoint"] for e in choice.excluded] == excluded
    assert choice.none_clean == (best is None and bool(excluded))


def test_choice_says_why_and_what_was_passed_over() -> None:
    choice = choose_best(TRAINING, "not_overtrained")
    assert choice.rule.startswith("lowest eval_score among checkpoints not flagged as over-trained")
    assert choice.excluded[1] == {"checkpoint": "a-400.safetensors", "step": 400, "eval_score": 0.1,
                                  "reasons": choice.excluded[1]["reasons"]}
    assert [r.split()[0] for r in choice.excluded[1]["reasons"]] == ["copies", "diversity"]
    assert exclusions_text(choice) == "2 excluded as over-trained (diversity, copies)"
    assert choice.flags == ()

    old = choose_best(TRAINING, "lowest_score")
    assert "flags ignored" in old.rule and [f.split()[0] for f in old.flags] == ["copies", "diversity"]
    assert exclusions_text(old) == "flagged: copies, diversity"

    none = choose_best([BASELINE_ROW, TRAINING[4]], "not_overtrained")
    assert none.best is None and "every evaluated checkpoint is flagged" in none.rule


def test_choose_best_with_bounds_and_bad_rule() -> None:
    assert choose_best(TRAINING, bounds=Bounds(max_copies=1, diversity_fraction=0.0)).best["step"] == "400"
    with pytest.raises(ValueError, match="rule"):
        choose_best(TRAINING, "latest")


def test_best_json_lists_the_exclusions(run_dir: Path) -> None:
    choice = choose_best(TRAINING, "not_overtrained")
    best = {**choice.best, "checkpoint": "a-step00000020.safetensors"}
    write_best(run_dir, best_file_name("a"), best, choice.rule, ckpt(run_dir, 20), choice.excluded)
    record = json.loads((run_dir / BEST_JSON).read_text())
    assert record["rule"] == choice.rule and record["flags"] == []
    assert [(e["checkpoint"], e["step"]) for e in record["excluded"]] == [("a-300.safetensors", 300),
                                                                          ("a-400.safetensors", 400)]
    assert all(e["reasons"] for e in record["excluded"])


def test_no_best_says_so_and_takes_down_the_old_best_file(run_dir: Path) -> None:
    write_best(run_dir, best_file_name("a"), row("a-step00000010.safetensors", 10), "r", ckpt(run_dir, 10))
    choice = choose_best([BASELINE_ROW, TRAINING[4]], "not_overtrained")
    write_no_best(run_dir, best_file_name("a"), choice.rule, choice.excluded)
    record = json.loads((run_dir / BEST_JSON).read_text())
    assert record["checkpoint"] is None and record["step"] is None
    assert record["excluded"][0]["checkpoint"] == "a-400.safetensors"
    assert not (run_dir / "a-best.safetensors").exists()
    assert ckpt(run_dir, 10).exists()  # the checkpoint itself stays
    assert leftovers(run_dir) == []


BASE_ROW = {"status": "baseline", "step": "0", "checkpoint": "baseline", "diversity": "0.4", "clip_t_holdout": "0.3"}


@pytest.mark.parametrize(
    ("by_strength", "rule", "expected"),
    [
        ({1.0: {"eval_score": 0.2}}, "not_overtrained", 1.0),
        ({0.5: {"eval_score": 0.3}, 1.0: {"eval_score": 0.2}}, "not_overtrained", 1.0),
        # full strength copies a training image: the rule prefers the clean lower scale
        ({0.5: {"eval_score": 0.3, "copies": 0}, 1.0: {"eval_score": 0.2, "copies": 2}}, "not_overtrained", 0.5),
        ({0.5: {"eval_score": 0.3, "copies": 0}, 1.0: {"eval_score": 0.2, "copies": 2}}, "lowest_score", 1.0),
        ({0.75: {"eval_score": 0.2, "diversity": 0.05}, 1.0: {"eval_score": 0.25}}, "not_overtrained", 1.0),
        ({1.0: {"eval_score": 0.2, "copies": 1}}, "not_overtrained", None),  # no clean scale
        ({0.8: {"eval_score": 0.2}, 1.2: {"eval_score": 0.2}}, "not_overtrained", 0.8),  # a tie: nearer 1.0 first
        ({1.0: {}}, "lowest_score", None),
    ],
)
def test_best_strength(by_strength: dict, rule: str, expected: float | None) -> None:
    from lora_monitor.policies.best_checkpoint import best_strength

    assert best_strength(by_strength, BASE_ROW, rule) == expected
