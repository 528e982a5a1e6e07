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
