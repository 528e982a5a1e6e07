"""Decisions after each row: best.json follows the [best] rule and its exclusions, early stopping on over-training
writes early_stop.json naming the flags, and the live view's texts name the exclusions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_monitor.config import parse_config
from lora_monitor.policies.decisions import EARLY_STOP_JSON, Decisions, write_report
from lora_monitor.run_spec import RunSpec
from lora_monitor.tracking.tracker import Tracker


def decisions(tmp_path: Path, toml: str = "") -> Decisions:
    config = parse_config(toml, tmp_path / "config.toml")
    spec = RunSpec(config=config, output_dir=tmp_path, output_name="a", csv_path=tmp_path / "loss_tracker.csv",
                   logging_dir=None, base_model=None, sdxl=False, reference_dirs=())
    return Decisions(spec, Tracker(spec.csv_path))


def add(d: Decisions, step: int, status: str = "ok", **cells: Any) -> Any:
    """Write one row (and, for a checkpoint, its file) and ask the decisions about it."""
    name = "baseline" if status == "baseline" else f"a-step{step:08d}.safetensors"
    if status != "baseline":
        (d.output_dir / name).write_bytes(f"weights {step}".encode())
    row = d.tracker.append({"step": step, "checkpoint": name, "status": status, **cells})
    return d.after_row(row)


def best_json(d: Decisions) -> dict[str, Any]:
    return json.loads((d.output_dir / "best.json").read_text())


def test_best_skips_overtrained_checkpoints_and_says_why(tmp_path: Path) -> None:
    d = decisions(tmp_path)
    add(d, 0, "baseline", eval_score=0.9, diversity=0.4, copies=0)
    add(d, 100, eval_score=0.5, diversity=0.35, copies=0)
    verdict = add(d, 200, eval_score=0.2, diversity=0.05, copies=2)
    assert verdict.best_text == ("a-step00000100.safetensors (step 100, eval_score 0.5000); "
                                 "1 excluded as over-trained (copies, diversity)")
    record = best_json(d)
    assert record["checkpoint"] == "a-step00000100.safetensors"
    assert [(e["checkpoint"], e["step"]) for e in record["excluded"]] == [("a-step00000200.safetensors", 200)]
    assert (tmp_path / "a-best.safetensors").read_bytes() == b"weights 100"
    assert not verdict.stop and verdict.patience_text is None  # early stopping is off by default


def test_old_rule_takes_the_lowest_score_and_names_its_flags(tmp_path: Path) -> None:
    d = decisions(tmp_path, '[best]\nrule = "lowest_score"\n')
    add(d, 0, "baseline", diversity=0.4)
    add(d, 100, eval_score=0.5, diversity=0.35)
    verdict = add(d, 200, eval_score=0.2, diversity=0.05)
    assert verdict.best_text == "a-step00000200.safetensors (step 200, eval_score 0.2000); flagged: diversity"
    assert best_json(d)["checkpoint"] == "a-step00000200.safetensors"
    assert best_json(d)["excluded"] == [] and best_json(d)["flags"][0].startswith("diversity")


def test_a_late_baseline_can_leave_no_clean_checkpoint(tmp_path: Path) -> None:
    d = decisions(tmp_path)
    add(d, 100, eval_score=0.5, diversity=0.05)  # nothing to compare with yet: clean
    assert best_json(d)["checkpoint"] == "a-step00000100.safetensors"
    verdict = add(d, 0, "baseline", diversity=0.4)  # eval-dir adds the base model's row afterwards
    assert verdict.best_text == "none clean - 1 excluded as over-trained (diversity)"
    record = best_json(d)
    assert record["checkpoint"] is None and record["excluded"][0]["step"] == 100
    assert "every evaluated checkpoint is flagged" in record["rule"]
    assert not (tmp_path / "a-best.safetensors").exists()
    verdict = add(d, 150, eval_score=0.6, diversity=0.3)
    assert verdict.best_text.startswith("a-step00000150.safetensors")
    assert best_json(d)["checkpoint"] == "a-step00000150.safetensors"
    assert (tmp_path / "a-best.safetensors").read_bytes() == b"weights 150"


def test_early_stop_on_overtraining_names_the_flags(tmp_path: Path) -> None:
    d = decisions(tmp_path, "[early_stopping]\novertraining = true\npatience = 2\n")
    add(d, 0, "baseline", diversity=0.4, clip_t_holdout=0.3)
    verdict = add(d, 100, eval_score=0.5, diversity=0.3, clip_t_holdout=0.31)
    assert not verdict.stop and verdict.patience_text == "2 over-trained evaluation(s) left"
    verdict = add(d, 200, eval_score=0.4, diversity=0.05, clip_t_holdout=0.31)
    assert not verdict.stop and verdict.patience_text == "1 over-trained evaluation(s) left"
    verdict = add(d, 300, eval_score=0.3, diversity=0.05, clip_t_holdout=0.2)
    assert verdict.stop and verdict.reason is not None
    assert verdict.reason.startswith("early stop at step 300: over-trained for 2 evaluation(s) in a row")
    assert "diversity" in verdict.reason and "clip_t_holdout" in verdict.reason
    d.record_early_stop(verdict.reason, {"step": "300"})
    record = json.loads((tmp_path / EARLY_STOP_JSON).read_text())
    assert record["reason"] == verdict.reason and record["overtraining"] is True
    assert [(f["step"], bool(f["reasons"])) for f in record["flags"]] == [(100, False), (200, True), (300, True)]
    assert record["best"] == "a-step00000100.safetensors"


def test_both_stop_rules_share_the_countdown_line(tmp_path: Path) -> None:
    d = decisions(tmp_path, "[early_stopping]\nenabled = true\novertraining = true\npatience = 3\n")
    verdict = add(d, 100, eval_score=0.5, copies=1)
    assert verdict.patience_text == "3 evaluation(s) without improvement left; 2 over-trained evaluation(s) left"
    assert verdict.best_text == "none clean - 1 excluded as over-trained (copies)"


def test_report_lists_the_excluded_checkpoints(tmp_path: Path) -> None:
    d = decisions(tmp_path)
    add(d, 0, "baseline", diversity=0.4)
    add(d, 100, eval_score=0.5, diversity=0.35)
    add(d, 200, eval_score=0.2, diversity=0.05, copies=1)
    page = write_report(d.spec).read_text()
    assert "excluded as over-trained" in page
    assert "a-step00000200.safetensors (step 200, eval_score 0.2): copies 1 &gt; 0" in page
    assert "diversity 0.050 &lt; 0.25 × baseline 0.400" in page


def test_report_says_when_no_checkpoint_is_clean(tmp_path: Path) -> None:
    d = decisions(tmp_path)
    add(d, 100, eval_score=0.2, copies=1)
    page = write_report(d.spec).read_text()
    assert "<dt>best</dt><dd class=\"stop\">none: every evaluated checkpoint is flagged as over-trained" in page
    assert "a-step00000100.safetensors (step 100, eval_score 0.2): copies 1 &gt; 0" in page
