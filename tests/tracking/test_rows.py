"""Rows: the trainer's float32 values are written as the shortest decimal that reads back as the same float32."""

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest

from lora_monitor.columns import COLUMNS
from lora_monitor.events import EvalResult
from lora_monitor.tracking.rows import TrainingValues, build_row, float32_decimal
from lora_monitor.tracking.tracker import format_row

CASES = [
    # (value as TensorBoard hands it back, the cell written)
    (float(np.float32(1e-4)), "0.0001"),  # 9.999999747378752e-05
    (float(np.float32(5e-5)), "5e-05"),
    (float(np.float32(3e-4)), "0.0003"),
    (float(np.float32(1e-7)), "1e-07"),
    (float(np.float32(1.09788)), "1.09788"),  # kohya's loss/average
    (float(np.float32(1 / 3)), "0.33333334"),  # 8 digits are needed to tell this float32 apart
    (1.1, "1.1"),  # a printed avr_loss stays as printed
    (1.22, "1.22"),
    (0.0, "0.0"),
    (-2.5, "-2.5"),
]


@pytest.mark.parametrize(("value", "cell"), CASES)
def test_float32_values_are_written_shortest(value: float, cell: str) -> None:
    row = build_row(EvalResult(Path("a-step00000002.safetensors"), 2, {"eval_score": 0.5}),
                    TrainingValues(loss=value, learning_rate=value))
    written = dict(zip(COLUMNS, next(csv.reader(io.StringIO(format_row(row)))), strict=True))
    assert written["total_loss"] == cell and written["learning_rate"] == cell
    assert np.float32(float(cell)) == np.float32(value)  # the same float32 reads back


@pytest.mark.parametrize("value", [None, math.inf, 1e300])
def test_values_outside_float32_are_left_as_they_are(value: float | None) -> None:
    assert float32_decimal(value) == value


def test_nan_stays_nan() -> None:
    assert math.isnan(float32_decimal(math.nan))  # type: ignore[arg-type]


def test_baseline_row() -> None:
    from lora_monitor.columns import BASELINE

    result = EvalResult(Path(BASELINE), 0, {"eval_score": 0.2, "copies": 0.0, "diversity": 0.15}, seconds=1.0,
                        baseline=True)
    row = build_row(result, TrainingValues())
    assert (row["step"], row["checkpoint"], row["status"]) == (0, "baseline", "baseline")
    assert row["copies"] == 0 and isinstance(row["copies"], int) and row["diversity"] == 0.15
    assert row["total_loss"] is None and row["val_loss"] is None


def test_signals_and_val_loss_reach_the_row() -> None:
    metrics = {"eval_score": 0.1, "clip_t_holdout": 0.2, "copy_distance": 0.3, "copies": 2.0, "unknown": 9.0}
    row = build_row(EvalResult(Path("a-step00000010.safetensors"), 10, metrics), TrainingValues(val_loss=1.0934513))
    assert row["copies"] == 2 and row["copy_distance"] == 0.3 and "unknown" not in row
    assert row["val_loss"] == 1.0934513 and row["status"] == "ok"
    assert set(row) <= set(COLUMNS)


def test_strength_rows() -> None:
    from lora_monitor.tracking.rows import strength_rows

    plain = EvalResult(Path("a.safetensors"), 10, {"eval_score": 0.1})
    assert strength_rows(plain) == []  # [eval] strengths = [1.0]: no strengths.csv
    swept = EvalResult(Path("a.safetensors"), 10, {"eval_score": 0.1, "copies": 1.0},
                       by_strength={0.5: {"eval_score": 0.3, "copies": 0.0}, 1.5: {"eval_score": 0.05}})
    rows = strength_rows(swept)
    assert [(r["strength"], r["eval_score"]) for r in rows] == [(0.5, 0.3), (1.0, 0.1), (1.5, 0.05)]
    assert rows[1]["copies"] == 1 and all(r["checkpoint"] == "a.safetensors" and r["step"] == 10 for r in rows)
    failed = EvalResult(Path("a.safetensors"), 10, error="boom", by_strength={0.5: {}})
    assert strength_rows(failed) == []
