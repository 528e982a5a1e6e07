"""EvalSchedule and EvalQueue: tables of saved steps -> evaluated steps, pop orders, thread safety."""

from __future__ import annotations

import threading
import time

import pytest

from lora_monitor.errors import UserError
from lora_monitor.policies.eval_schedule import EvalQueue, EvalSchedule

STAGED = ((100, 50), (200, 20), (10**9, 10))  # every 50 steps up to 100, every 20 up to 200, then every 10


def saves(every: int, last: int, start: int | None = None) -> list[tuple[int | None, bool]]:
    first = every if start is None else start
    return [(step, False) for step in range(first, last + 1, every)]


@pytest.mark.parametrize(
    ("schedule", "saved", "evaluated"),
    [
        (EvalSchedule(dynamic=STAGED), saves(10, 230), [50, 100, 120, 140, 160, 180, 200, 210, 220, 230]),
        (EvalSchedule(dynamic=STAGED), saves(25, 300), [50, 100, 125, 150, 175, 200, 225, 250, 275, 300]),
        (EvalSchedule(every_n_steps=50), saves(25, 200), [50, 100, 150, 200]),
        (EvalSchedule(every_n_steps=50), saves(30, 240), [60, 120, 180, 240]),
        (EvalSchedule(every_n_steps=50), saves(25, 50, start=0), [0, 50]),
        (EvalSchedule(every_n_steps=100), [(50, False), (100, False), (150, True)], [100, 150]),
        (EvalSchedule(every_n_steps=100), [(100, False), (100, True)], [100, 100]),
        (EvalSchedule(every_n_steps=100), [(100, False), (100, False)], [100]),
        (EvalSchedule(every_n_steps=100), [(None, False), (30, False)], [None]),
        (EvalSchedule(every_n_steps=1), saves(1, 4), [1, 2, 3, 4]),
        (EvalSchedule(dynamic=[(10, 5), (20, 1)]), saves(1, 24), [5, 10, *range(11, 25)]),
        (EvalSchedule(dynamic=[(10**9, 7)]), saves(3, 30), [9, 18, 27]),
    ],
)
def test_should_eval(
    schedule: EvalSchedule, saved: list[tuple[int | None, bool]], evaluated: list[int]
) -> None:
    assert [step for step, final in saved if schedule.should_eval(step, final)] == evaluated


@pytest.mark.parametrize(
    ("schedule", "step", "interval"),
    [
        (EvalSchedule(dynamic=STAGED), 0, 50),
        (EvalSchedule(dynamic=STAGED), 100, 50),
        (EvalSchedule(dynamic=STAGED), 101, 20),
        (EvalSchedule(dynamic=STAGED), 200, 20),
        (EvalSchedule(dynamic=STAGED), 5000, 10),
        (EvalSchedule(dynamic=[(10, 5)]), 50, 5),
        (EvalSchedule(every_n_steps=25), 10**6, 25),
    ],
)
def test_interval_at(schedule: EvalSchedule, step: int, interval: int) -> None:
    assert schedule.interval_at(step) == interval


def test_a_rule_is_required() -> None:
    with pytest.raises(UserError, match="every_n_steps or dynamic"):
        EvalSchedule()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 10, "dynamic": [(100, 10)]}, "not both"),
        ({"every_n_steps": 0}, "every_n_steps = 0 must be"),
        ({"every_n_steps": True}, "every_n_steps = True must be"),
        ({"dynamic": []}, "dynamic is empty"),
        ({"dynamic": [(100, 0)]}, "dynamic[0] = (100, 0): every must be >= 1"),
        ({"dynamic": [(100, 10), (100, 5)]}, "dynamic[1] until_step 100 is not after 100"),
        ({"dynamic": [(200, 10), (100, 5)]}, "increasing until_step"),
    ],
)
def test_schedule_rejects(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match="eval schedule") as info:
        EvalSchedule(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_schedule_is_thread_safe() -> None:
    schedule = EvalSchedule(every_n_steps=10)
    accepted: list[int] = []
    lock = threading.Lock()

    def ask() -> None:
        if schedule.should_eval(10, False):
            with lock:
                accepted.append(10)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert accepted == [10]


Q = "q"  # marks a pop in the operation tables below


@pytest.mark.parametrize(
    ("newest_first", "operations", "popped", "left"),
    [
        (True, [("a", 10), ("b", 20), ("c", 30), Q], ["c"], ["b", "a"]),
        (True, [("a", 10), Q, ("b", 20), ("c", 30), Q, ("d", 40), Q], ["a", "c", "d"], ["b"]),
        (True, [("final", None), ("a", 10), Q], ["final"], ["a"]),
        (True, [("b", 20), ("a", 20), Q], ["b"], ["a"]),  # same step: the first saved (kohya's step file)
        (False, [("b", 20), ("a", 10), ("c", 30), Q, Q], ["a", "b"], ["c"]),
        (False, [("final", None), ("a", 10), Q], ["a"], ["final"]),
        (True, [Q, ("a", 10), ("a", 10), Q, Q], [None, "a", None], []),
        # the baseline (pushed as first) before every checkpoint, whichever order and whenever it came
        (True, [("a", 10), ("base", 0, True), ("b", 20), Q, Q], ["base", "b"], ["a"]),
        (False, [("a", 10), ("final", None), ("base", 0, True), Q, Q], ["base", "a"], ["final"]),
        (True, [("a", 10), ("base", 0, True)], [], ["base", "a"]),
    ],
)
def test_queue_order(newest_first: bool, operations: list, popped: list, left: list) -> None:
    queue: EvalQueue[str] = EvalQueue(newest_first=newest_first)
    got = []
    for op in operations:
        if op == Q:
            got.append(queue.pop())
        else:
            queue.push(*op)
    assert got == popped
    assert queue.pending() == left
    assert len(queue) == len(left)


def test_backfill_takes_the_rest_oldest_first() -> None:
    queue: EvalQueue[str] = EvalQueue()
    for name, step in [("s30", 30), ("final", None), ("s10", 10), ("s20", 20)]:
        queue.push(name, step)
    assert queue.pop() == "final"
    assert queue.backfill() == ["s10", "s20", "s30"]
    assert len(queue) == 0 and queue.pending() == [] and queue.pop() is None


def test_push_refuses_duplicates() -> None:
    queue: EvalQueue[str] = EvalQueue()
    assert queue.push("a", 10)
    assert not queue.push("a", 10)
    assert len(queue) == 1


def test_pop_waits_for_a_push() -> None:
    queue: EvalQueue[str] = EvalQueue()
    timer = threading.Timer(0.05, queue.push, args=("late", 5))
    started = time.monotonic()
    timer.start()
    assert queue.pop(timeout=5.0) == "late"
    assert time.monotonic() - started < 4.0
    assert queue.pop(timeout=0.01) is None


def test_queue_is_thread_safe() -> None:
    queue: EvalQueue[int] = EvalQueue()
    received: list[int] = []
    lock = threading.Lock()
    done = threading.Event()

    def produce(offset: int) -> None:
        for i in range(250):
            queue.push(offset + i, offset + i)

    def consume() -> None:
        while not done.is_set() or len(queue):
            item = queue.pop(timeout=0.01)
            if item is not None:
                with lock:
                    received.append(item)

    producers = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(4)]
    consumers = [threading.Thread(target=consume) for _ in range(3)]
    for thread in producers + consumers:
        thread.start()
    for thread in producers:
        thread.join()
    done.set()
    for thread in consumers:
        thread.join()
    assert sorted(received) == sorted(k * 1000 + i for k in range(4) for i in range(250))
