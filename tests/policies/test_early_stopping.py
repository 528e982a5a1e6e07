"""EarlyStopping: tables of metric sequences -> the step at which training stops."""

from __future__ import annotations

import math

import pytest

from lora_monitor.errors import UserError
from lora_monitor.policies.early_stopping import METRIC_MODES, EarlyStopping

NAN = math.nan
INF = math.inf


def first_stop(es: EarlyStopping, values: list[float], every: int = 10) -> int | None:
    """Feed evaluations one at a time (steps every, 2*every, ...) and return the step of the first stop."""
    history: list[tuple[int, float]] = []
    for i, value in enumerate(values, start=1):
        history.append((i * every, value))
        stop, _ = es.decide(history)
        if stop:
            return i * every
    return None


@pytest.mark.parametrize(
    ("name", "es", "values", "expected"),
    [
        ("plateau", EarlyStopping(patience=3), [5, 4, 3, 3, 3, 3], 60),
        ("steady improvement", EarlyStopping(patience=1), [5, 4, 3, 2, 1], None),
        ("rise after best", EarlyStopping(patience=2), [1.0, 0.8, 0.9, 1.0, 1.1], 40),
        ("gain within min_delta", EarlyStopping(patience=2, min_delta=0.1), [1.0, 0.95, 0.92, 0.5], 30),
        ("gain equal to min_delta is not a gain", EarlyStopping(patience=1, min_delta=0.25), [1.0, 0.75], 20),
        ("gain above min_delta", EarlyStopping(patience=1, min_delta=0.25), [1.0, 0.5, 0.125], None),
        ("clip_t is max by default", EarlyStopping(monitor="clip_t", patience=2), [0.2, 0.3, 0.3, 0.29], 40),
        ("clip_t rising", EarlyStopping(monitor="clip_t", patience=1), [0.2, 0.3, 0.4], None),
        ("mode override", EarlyStopping(mode="max", patience=1), [1.0, 0.5], 20),
        ("min_step delays", EarlyStopping(patience=1, min_step=50), [1, 2, 3, 4, 5, 6], 50),
        ("min_step after plateau", EarlyStopping(patience=2, min_step=30), [1, 1, 1, 1], 30),
        ("NaN ignored", EarlyStopping(patience=2), [1.0, NAN, NAN, NAN, 0.9], None),
        ("NaN does not use patience", EarlyStopping(patience=2), [1.0, 1.1, NAN, 1.2], 40),
        ("all NaN", EarlyStopping(patience=1), [NAN, NAN, NAN], None),
        ("NaN first", EarlyStopping(patience=1), [NAN, 1.0, 1.0], 30),
        ("inf ignored", EarlyStopping(patience=2), [1.0, INF, -INF, 1.1], None),
        ("patience 0", EarlyStopping(patience=0), [1.0, 0.9, 0.95], 30),
        ("patience 1", EarlyStopping(patience=1), [1.0, 0.9, 0.95], 30),
        ("patience 0 first value", EarlyStopping(patience=0), [1.0], None),
        ("improvement resets count", EarlyStopping(patience=3), [1, 1.1, 1.2, 0.5, 0.6, 0.7, 0.8], 70),
        ("disabled", EarlyStopping(patience=1, enabled=False), [1, 2, 3], None),
    ],
)
def test_stop_step(name: str, es: EarlyStopping, values: list[float], expected: int | None) -> None:
    assert first_stop(es, values) == expected, name


def test_history_is_judged_in_step_order() -> None:
    # Newest-first evaluation: step 40 first, then the skipped ones backfilled; all improve in step order.
    es = EarlyStopping(patience=1)
    stop, reason = es.decide([(40, 0.5), (10, 1.0), (20, 0.9), (30, 0.8)])
    assert not stop
    assert "best 0.5 at step 40" in reason


@pytest.mark.parametrize(
    ("history", "stop"),
    [
        ([(10, 1.0), (20, 0.9), (20, 0.9)], False),
        ([(10, 1.0), (20, 0.9), (20, 1.1)], True),
        ([(10, 1.0), (20, 1.1), (20, 0.9)], False),
        ([(10, 1.0), (20, 0.9), (20, NAN)], False),
    ],
)
def test_repeated_step_counts_once(history: list[tuple[int, float]], stop: bool) -> None:
    assert EarlyStopping(patience=1).decide(history)[0] is stop


def test_reason_names_step_best_and_history() -> None:
    es = EarlyStopping(patience=2)
    stop, reason = es.decide([(10, 0.5), (20, 0.4), (30, 0.45), (40, 0.41)])
    assert stop
    assert reason.startswith("early stop at step 40: eval_score did not improve for 2 evaluation(s)")
    assert "best 0.4 at step 20 (min)" in reason
    assert "history [10: 0.5, 20: 0.4, 30: 0.45, 40: 0.41]" in reason


def test_reason_when_not_stopping() -> None:
    es = EarlyStopping(patience=3, min_delta=0.01)
    stop, reason = es.decide([(10, 0.5), (20, 0.6)])
    assert not stop
    assert "1 of 3 evaluation(s) without improvement" in reason
    stop, reason = es.decide([(10, NAN)])
    assert not stop and "no finite value" in reason


def test_long_history_is_elided() -> None:
    es = EarlyStopping(patience=100)
    _, reason = es.decide([(i, float(i)) for i in range(1, 31)])
    assert "..., 19: 19" in reason and "1: 1," not in reason


@pytest.mark.parametrize(
    ("es", "values", "left"),
    [
        (EarlyStopping(patience=3), [], 3),
        (EarlyStopping(patience=3), [1.0], 3),
        (EarlyStopping(patience=3), [1.0, 1.1], 2),
        (EarlyStopping(patience=3), [1.0, 1.1, 1.2, 1.3, 1.4], 0),
        (EarlyStopping(patience=3), [1.0, 1.1, 0.5], 3),
        (EarlyStopping(patience=3), [1.0, NAN, 1.1], 2),
        (EarlyStopping(patience=0), [1.0], 1),
        (EarlyStopping(monitor="clip_t", patience=2), [0.3, 0.2], 1),
    ],
)
def test_evaluations_left(es: EarlyStopping, values: list[float], left: int) -> None:
    assert es.evaluations_left([(10 * (i + 1), v) for i, v in enumerate(values)]) == left


NAMES = ["clip_t", "color_loss", "eval_score", "fashion_clip_loss", "total_loss", "visual_loss"]


@pytest.mark.parametrize(
    ("es", "names", "message"),
    [
        (EarlyStopping(monitor="eval_scor"), NAMES, "did you mean 'eval_score'?"),
        (EarlyStopping(monitor="lpips"), NAMES, "use one of: clip_t, color_loss, eval_score"),
        (EarlyStopping(mode="down"), NAMES, "mode = 'down' is not valid"),
        (EarlyStopping(patience=-1), NAMES, "patience = -1 is negative"),
        (EarlyStopping(min_delta=-0.1), NAMES, "min_delta = -0.1 must be"),
        (EarlyStopping(min_delta=NAN), NAMES, "min_delta = nan must be"),
        (EarlyStopping(min_step=-5), NAMES, "min_step = -5 is negative"),
        (EarlyStopping(monitor="lpips"), [*NAMES, "lpips"], "has no known direction"),
    ],
)
def test_validate_rejects(es: EarlyStopping, names: list[str], message: str) -> None:
    with pytest.raises(UserError, match="early stopping") as info:
        es.validate(names)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_validate_accepts() -> None:
    EarlyStopping().validate(NAMES)
    EarlyStopping(monitor="lpips", mode="min").validate([*NAMES, "lpips"])
    assert all(EarlyStopping(monitor=m).resolved_mode == METRIC_MODES[m] for m in METRIC_MODES)
