"""Over-training flags: tables of (row, baseline, history) -> the columns flagged, and the reasons' wording."""

from __future__ import annotations

from typing import Any

import pytest

from lora_monitor.policies.overtraining import Bounds, baseline_of, flag_names, flag_rows, flags


def row(step: Any, status: str = "ok", **cells: Any) -> dict[str, str]:
    return {"step": str(step), "checkpoint": f"a-{step}.safetensors", "status": status,
            **{k: str(v) for k, v in cells.items()}}


BASE = row(0, "baseline", checkpoint="baseline", diversity="0.40", clip_t_holdout="0.30", copies="0")
NO_SIGNALS = row(0, "baseline")  # an older CSV's row, or a baseline evaluated without these signals


@pytest.mark.parametrize(
    ("cells", "baseline", "expected"),
    [
        ({}, BASE, []),
        ({"copies": "0"}, BASE, []),
        ({"copies": "1"}, BASE, ["copies"]),
        ({"copies": "3"}, None, ["copies"]),  # a copy needs no baseline
        ({"copies": ""}, BASE, []),
        ({"diversity": "0.11"}, BASE, []),  # 0.11 >= 0.25 × 0.40
        ({"diversity": "0.10"}, BASE, []),  # exactly a quarter is not below a quarter
        ({"diversity": "0.09"}, BASE, ["diversity"]),
        ({"diversity": "0.0"}, BASE, ["diversity"]),  # collapse: every seed the same image
        ({"diversity": "0.01"}, None, []),  # nothing to compare with
        ({"diversity": "0.01"}, NO_SIGNALS, []),
        ({"diversity": ""}, BASE, []),  # seeds_per_prompt = 1
        ({"clip_t_holdout": "0.28"}, BASE, []),  # 0.02 below: within the margin
        ({"clip_t_holdout": "0.26"}, BASE, ["clip_t_holdout"]),  # 0.04 below
        ({"clip_t_holdout": "0.45"}, BASE, []),  # better than the base model
        ({"clip_t_holdout": "0.1"}, NO_SIGNALS, []),
        ({"clip_t_holdout": "nan"}, BASE, []),
        ({"copies": "2", "diversity": "0.05", "clip_t_holdout": "0.2"}, BASE,
         ["copies", "diversity", "clip_t_holdout"]),
    ],
)
def test_flags_against_the_baseline(cells: dict[str, str], baseline: dict[str, str] | None,
                                    expected: list[str]) -> None:
    assert flag_names(flags(row(100, **cells), baseline, [])) == expected


# val_loss rises past its minimum over the rows up to this step (by step), by more than 5 % of it.
VAL = [row(100, val_loss=0.100), row(200, val_loss=0.090), row(300, val_loss=0.094), row(400, val_loss=0.095)]


@pytest.mark.parametrize(
    ("history", "current", "flagged"),
    [
        (VAL, row(500, val_loss=0.094), False),  # 4.4 % above the lowest (0.090 at step 200)
        (VAL, row(500, val_loss=0.0946), True),  # 5.1 % above
        (VAL, row(200, val_loss=0.090), False),  # the minimum itself
        (VAL, row(150, val_loss=0.104), False),  # only step 100 (0.100) comes before it: 4 %
        (VAL, row(150, val_loss=0.106), True),  # 6 % above step 100's
        (VAL[:1], row(500, val_loss=0.104), False),
        ([row(400, val_loss=0.090)], row(300, val_loss=0.1), False),  # a later step's minimum does not count
        ([row(100, "failed", val_loss=0.05)], row(200, val_loss=0.1), False),  # a failed row is not judged
        ([row(0, "baseline", val_loss=0.05)], row(200, val_loss=0.1), False),  # nor is the base model
        ([row(100, "duplicate", val_loss=0.08)], row(200, val_loss=0.1), True),  # a duplicate is a checkpoint
        (VAL, row(500, val_loss=""), False),
        ([row(100, val_loss=""), row(200, val_loss="")], row(300, val_loss=0.2), False),
    ],
)
def test_val_loss_against_its_minimum(history: list[dict[str, str]], current: dict[str, str], flagged: bool) -> None:
    assert flag_names(flags(current, None, history)) == (["val_loss"] if flagged else [])


def test_history_in_arrival_order_is_judged_by_step() -> None:
    # step 200 (the lowest) was backfilled after step 400: it still counts for every step after 200
    arrived = [row(100, val_loss=0.100), row(400, val_loss=0.099), row(200, val_loss=0.090)]
    assert flag_names(flags(arrived[1], None, arrived)) == ["val_loss"]
    assert flags(arrived[0], None, arrived) == []


@pytest.mark.parametrize(
    ("bounds", "cells", "expected"),
    [
        (Bounds(max_copies=2), {"copies": "2"}, []),
        (Bounds(max_copies=2), {"copies": "3"}, ["copies"]),
        (Bounds(diversity_fraction=0.0), {"diversity": "0.0"}, []),  # 0 turns the check off
        (Bounds(diversity_fraction=0.9), {"diversity": "0.35"}, ["diversity"]),
        (Bounds(holdout_margin=0.0), {"clip_t_holdout": "0.299"}, ["clip_t_holdout"]),
        (Bounds(holdout_margin=float("inf")), {"clip_t_holdout": "-1"}, []),
    ],
)
def test_bounds(bounds: Bounds, cells: dict[str, str], expected: list[str]) -> None:
    assert flag_names(flags(row(100, **cells), BASE, [], bounds)) == expected


def test_val_loss_margin_is_relative() -> None:
    history = [row(100, val_loss=10.0)]
    assert flags(row(200, val_loss=10.4), None, history, Bounds(val_loss_margin=0.05)) == []
    assert flags(row(200, val_loss=10.6), None, history, Bounds(val_loss_margin=0.05)) != []
    assert flags(row(200, val_loss=1e9), None, history, Bounds(val_loss_margin=float("inf"))) == []


def test_reasons_say_what_and_against_what() -> None:
    history = [row(100, val_loss=0.09)]
    reasons = flags(row(200, copies=2, diversity=0.08, clip_t_holdout=0.2, val_loss=0.1), BASE, history)
    assert reasons == [
        "copies 2 > 0 (images closer to a training image than copy_threshold)",
        "diversity 0.080 < 0.25 × baseline 0.400 (seeds give near-identical images)",
        "clip_t_holdout 0.200 < baseline 0.300 − 0.03 (ignores new prompts)",
        "val_loss 0.1 > 1.05 × its lowest 0.09 (step 100)",
    ]


def test_baseline_of_takes_the_latest_and_flag_rows_judges_checkpoints_only() -> None:
    rows = [row(0, "baseline", diversity=0.1), row(100, diversity=0.08), row(200, "failed"),
            row(0, "baseline", diversity=0.4), row(300, "duplicate", diversity=0.08), row(400, "skipped")]
    assert baseline_of(rows) is rows[3]
    assert baseline_of(rows[1:3]) is None
    judged = flag_rows(rows)
    assert [r["step"] for r, _ in judged] == ["100", "300"]
    # the later baseline (diversity 0.4) flags both, though the first (0.1) was in force when 100 was written
    assert [flag_names(reasons) for _, reasons in judged] == [["diversity"], ["diversity"]]
