"""EarlyStopping: tables of metric sequences -> the step at which training stops; the same for over-training flags."""

from __future__ import annotations

import math

import pytest

from lora_monitor.errors import UserError
from lora_monitor.policies.early_stopping import METRIC_MODES, EarlyStopping, OvertrainingStop

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


@pytest.mark.parametrize(
    ("monitor", "values", "expected"),
    [
        ("diversity", [0.4, 0.3, 0.2, 0.1], 30),  # max: falling from the first evaluation on
        ("clip_t_holdout", [0.25, 0.28, 0.27, 0.26], 40),  # max
        ("copy_distance", [0.6, 0.5, 0.3], 30),  # max: lower is closer to a copy
        ("copies", [0, 0, 1], 30),  # min: the first evaluation without a gain ends the wait
        ("val_loss", [0.10, 0.09, 0.095, 0.1], 40),  # min
    ],
)
def test_new_columns_take_their_direction(monitor: str, values: list[float], expected: int | None) -> None:
    assert first_stop(EarlyStopping(monitor=monitor, patience=2), values) == expected


# --------------------------------------------- [early_stopping] overtraining: flagged evaluations in a row
F = ["copies 1 > 0 (images closer to a training image than copy_threshold)"]
D = ["diversity 0.100 < 0.5 × baseline 0.400 (seeds give near-identical images)"]


def first_overtraining_stop(rule: OvertrainingStop, flags: list[list[str]], every: int = 10) -> int | None:
    history: list[tuple[int, list[str]]] = []
    for i, reasons in enumerate(flags, start=1):
        history.append((i * every, reasons))
        stop, _ = rule.decide(history)
        if stop:
            return i * every
    return None


@pytest.mark.parametrize(
    ("name", "rule", "flags", "expected"),
    [
        ("clean run", OvertrainingStop(patience=1), [[], [], []], None),
        ("patience 3", OvertrainingStop(patience=3), [[], F, D, F, []], 40),
        ("a clean one breaks the run", OvertrainingStop(patience=2), [F, [], F, [], F, D], 60),
        ("patience 1", OvertrainingStop(patience=1), [[], F], 20),
        ("patience 0 acts as 1", OvertrainingStop(patience=0), [[], F], 20),
        ("min_step waits", OvertrainingStop(patience=1, min_step=35), [F, F, F, F], 40),
        ("off", OvertrainingStop(patience=1, enabled=False), [F, F, F], None),
        ("empty", OvertrainingStop(patience=1), [], None),
    ],
)
def test_overtraining_stop(name: str, rule: OvertrainingStop, flags: list[list[str]], expected: int | None) -> None:
    assert first_overtraining_stop(rule, flags) == expected, name


def test_overtraining_is_judged_by_step() -> None:
    rule = OvertrainingStop(patience=2)
    # step 25 (clean) was backfilled after 30 and 40: the flagged run is 30, 40 only when 25 is not between
    assert rule.decide([(20, F), (30, F), (40, F), (25, [])])[0]
    assert not rule.decide([(20, F), (40, F), (30, [])])[0]
    # a step evaluated twice counts once, with its latest flags
    assert not rule.decide([(10, F), (20, F), (20, [])])[0]
    assert rule.evaluations_left([(10, F), (20, F), (20, [])]) == 2
    assert rule.evaluations_left([(10, []), (20, F)]) == 1
    assert rule.evaluations_left([(10, F), (20, F), (30, F)]) == 0


def test_overtraining_reason_names_the_flags() -> None:
    stop, reason = OvertrainingStop(patience=2).decide([(10, []), (20, F), (30, F + D)])
    assert stop
    assert reason.startswith("early stop at step 30: over-trained for 2 evaluation(s) in a row")
    assert "flagged at steps 20, 30" in reason and "copies 1 > 0" in reason and "diversity 0.100" in reason
    stop, reason = OvertrainingStop(patience=3).decide([(10, []), (20, F)])
    assert not stop and "1 of 3 flagged evaluation(s)" in reason
    stop, reason = OvertrainingStop(patience=3).decide([(10, F), (20, [])])
    assert not stop and "not flagged" in reason
