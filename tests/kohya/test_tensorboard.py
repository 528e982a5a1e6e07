"""kohya/tensorboard: kohya's TensorBoard scalars, written here with torch's SummaryWriter (what accelerate uses)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from lora_monitor.kohya.tensorboard import LogFollower, StepFacts, facts_of, read_run, run_for_session, run_stamp
from tests.kohya_replay import FIXTURES

torch.set_num_threads(1)


def fixture_scalars() -> dict[str, dict[int, float]]:
    """tensorboard_scalars.txt of the captured run: `  tag [(step, value), ...]` lines."""
    text = (FIXTURES / "run-python-u" / "tensorboard_scalars.txt").read_text(encoding="utf-8")
    scalars = {}
    for line in text.splitlines()[1:]:
        tag, pairs = line.split(maxsplit=1)
        scalars[tag] = {int(s): float(v) for s, v in re.findall(r"\((\d+), ([-\d.e]+)\)", pairs)}
    return scalars


def write_run(folder: Path, scalars: dict[str, dict[int, float]]) -> None:
    writer = SummaryWriter(str(folder))
    for tag, values in scalars.items():
        for step, value in values.items():
            writer.add_scalar(tag, value, step)
    writer.close()


def test_reads_the_fixture_run(tmp_path: Path) -> None:
    expected = fixture_scalars()
    run = tmp_path / "logs" / "20261126211501"
    write_run(run / "network_train", expected)
    facts = read_run(run)
    assert facts.loss == pytest.approx(expected["loss/average"], rel=1e-6)  # stored as float32
    assert facts.lr_at(3) == pytest.approx(1e-4)
    assert facts.last_step == max(expected["loss/average"])


def test_reads_kohyas_real_validation_run() -> None:
    """The event file kohya itself wrote (run-validation)."""
    run = FIXTURES / "run-validation" / "logs" / "20261130133019"
    facts = read_run(run)
    assert facts.last_step == 6
    assert set(facts.loss) == {1, 2, 3, 4, 5, 6}
    assert facts.lr_at(6) is not None


def test_follower_reads_only_new_events_of_this_launch(tmp_path: Path) -> None:
    old = tmp_path / "20260101000000" / "network_train"
    write_run(old, {"lr/unet": {1: 9e-4}, "loss/average": {1: 9.0}})
    long_ago = time.time() - 3600
    for path in old.iterdir():
        os.utime(path, (long_ago, long_ago))
    follower = LogFollower(tmp_path, since=time.time() - 1.0)
    assert not follower.poll() and follower.facts.last_step is None
    writer = SummaryWriter(str(tmp_path / "20260102000000" / "network_train"))
    writer.add_scalar("loss/average", 1.5, 1)
    writer.add_scalar("lr/unet", 1e-4, 1)
    writer.flush()
    assert follower.poll()
    assert follower.facts.last_step == 1 and follower.facts.loss == {1: 1.5}
    assert not follower.poll()  # nothing new
    writer.add_scalar("loss/average", 1.25, 2)
    writer.flush()
    assert follower.poll()
    assert follower.facts.loss == {1: 1.5, 2: 1.25} and follower.facts.lr_at(2) == pytest.approx(1e-4)
    writer.close()


def test_lora_monitor_run_beside_kohya_is_not_read(tmp_path: Path) -> None:
    from lora_monitor.tracking.tensorboard_writer import TensorBoardWriter

    ours = TensorBoardWriter(tmp_path)
    ours.add_row(2, {"eval_score": 0.5})
    ours.close()
    follower = LogFollower(tmp_path, since=0.0)
    assert not follower.poll() and follower.run is None


@pytest.mark.parametrize(
    ("scalars", "step", "expected"),
    [
        ({"lr/unet": {1: 1e-4}, "lr/group0": {1: 2e-4}, "lr/group1": {1: 3e-4}}, 1, 1e-4),
        ({"lr/group0": {1: 2e-4}, "lr/group1": {1: 3e-4}}, 1, 2e-4),
        ({"lr/textencoder": {1: 5e-5}, "lr/group1": {1: 3e-4}}, 1, 3e-4),  # kohya's SD1 run, unet_only
        ({"lr/textencoder": {1: 5e-5}}, 1, None),
        ({"lr/unet": {1: 1e-4, 5: 5e-5}}, 4, 1e-4),  # not logged at this step: the latest before it
        ({"lr/unet": {1: 1e-4, 5: 5e-5}}, 5, 5e-5),
        ({"lr/unet": {3: 1e-4}}, 2, None),
        ({"lr/unet": {}, "lr/group0": {2: 7e-5}}, 2, 7e-5),
        ({}, 1, None),
    ],
)
def test_learning_rate_at(scalars: dict[str, dict[int, float]], step: int, expected: float | None) -> None:
    assert facts_of(scalars).lr_at(step) == expected


def _stamped(root: Path, stamp: float, last_write: float) -> Path:
    run = root / time.strftime("%Y%m%d%H%M%S", time.localtime(stamp))
    write_run(run / "network_train", {"loss/average": {1: 1.0}})
    for path in (run / "network_train").iterdir():
        os.utime(path, (last_write, last_write))
    return run


@pytest.mark.parametrize(
    ("runs", "started", "expected"),
    [
        # (folder stamp, last write) relative to t0; the session started at t0 + `started`
        ([(0, 600)], 60, 0),  # named before model loading, written during training
        ([(0, 600), (1000, 1600)], 1060, 1),  # the later session's own folder
        ([(0, 600), (1000, 1600)], 60, 0),  # the earlier session: the later folder starts after it
        ([(0, 50)], 100, None),  # last written before the session started: an earlier run
        ([(200, 600)], 100, None),  # named after the session started: a later run
        ([(0, 9000)], 5000, None),  # named more than an hour before: not this session
        ([(0, 600)], None, None),  # a file with no ss_training_started_at
    ],
)
def test_run_for_session(tmp_path: Path, runs: list[tuple[int, int]], started: int | None,
                         expected: int | None) -> None:
    t0 = float(int(time.time()) - 20000)
    folders = [_stamped(tmp_path, t0 + stamp, t0 + write) for stamp, write in runs]
    found = run_for_session(tmp_path, None if started is None else t0 + started)
    assert found == (None if expected is None else folders[expected])


def test_run_stamp() -> None:
    assert run_stamp(Path("x/20261130133019")) == time.mktime((2026, 11, 30, 13, 30, 19, 0, 0, -1))
    assert run_stamp(Path("x/prefix20261130133019")) is not None
    assert run_stamp(Path("x/lora-monitor")) is None
    assert StepFacts().lr_at(1) is None


# ------------------------------------------------------------------------------- held-out validation loss
# kohya's own run-validation (--validation_split 0.25 --validate_every_n_steps 2, 6 steps, 1 epoch): read once
# from its event file. step_average at steps 2, 4, 6; epoch_average 1.0834448 at TensorBoard step 1 (= epoch 1).
KOHYA_STEP_VALIDATION = {2: 1.0934512615203857, 4: 1.0911898612976074, 6: 1.0886081457138062}


def write_in_order(folder: Path, events: list[tuple[str, int, float]]) -> None:
    """Write (tag, step, value) events in this order, as kohya's loop does."""
    writer = SummaryWriter(str(folder))
    for tag, step, value in events:
        writer.add_scalar(tag, value, step)
    writer.close()


def test_validation_loss_of_kohyas_real_run() -> None:
    facts = read_run(FIXTURES / "run-validation" / "logs" / "20261130133019")
    assert facts.val_loss == pytest.approx(KOHYA_STEP_VALIDATION, rel=1e-7)
    for step, expected in [(1, None), (2, 1.0934512615203857), (3, 1.0934512615203857), (5, 1.0911898612976074),
                           (6, 1.0886081457138062), (100, 1.0886081457138062)]:
        assert facts.val_loss_at(step) == pytest.approx(expected)


def test_a_run_without_validation_has_no_validation_loss(tmp_path: Path) -> None:
    run = tmp_path / "20261126211501"
    write_run(run / "network_train", fixture_scalars())
    facts = read_run(run)
    assert facts.val_loss == {} and facts.val_loss_at(6) is None


def _epoch_only_run(steps_per_epoch: int, epochs: int) -> list[tuple[str, int, float]]:
    """kohya with --validation_split and no --validate_every_n_steps: a validation after every epoch."""
    events, step = [], 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            events += [("loss/current", step, 1.0), ("loss/average", step, 1.0)]
        events += [("loss/validation/epoch_average", epoch, 0.5 + epoch / 10),
                   ("loss/validation/epoch_divergence", epoch, -0.1), ("loss/epoch_average", epoch, 1.0)]
    return events


def test_epoch_validation_is_placed_at_its_epochs_last_step(tmp_path: Path) -> None:
    run = tmp_path / "20261126211501"
    write_in_order(run / "network_train", _epoch_only_run(steps_per_epoch=3, epochs=3))
    facts = read_run(run)
    assert facts.val_loss == pytest.approx({3: 0.6, 6: 0.7, 9: 0.8})  # epoch numbers 1..3 are not steps
    assert facts.val_loss_at(2) is None and facts.val_loss_at(5) == pytest.approx(0.6)


def test_step_validation_wins_over_epoch_validation(tmp_path: Path) -> None:
    events = _epoch_only_run(steps_per_epoch=4, epochs=2)
    events.insert(4, ("loss/validation/step_average", 2, 0.9))  # after step 2's training scalars
    run = tmp_path / "20261126211501"
    write_in_order(run / "network_train", events)
    assert read_run(run).val_loss == pytest.approx({2: 0.9})  # one kind of average per curve


def test_follower_places_an_epoch_validation_read_in_a_later_poll(tmp_path: Path) -> None:
    follower = LogFollower(tmp_path, since=time.time() - 1.0)
    writer = SummaryWriter(str(tmp_path / "20260102000000" / "network_train"))
    for step in (1, 2):
        writer.add_scalar("loss/average", 1.0, step)
    writer.flush()
    assert follower.poll() and follower.facts.val_loss == {}
    writer.add_scalar("loss/validation/epoch_average", 0.75, 1)
    writer.add_scalar("loss/average", 1.0, 3)
    writer.flush()
    assert follower.poll()
    assert follower.facts.val_loss == {2: 0.75} and follower.facts.val_loss_at(3) == 0.75
    writer.close()


@pytest.mark.parametrize(
    ("val_loss", "step", "expected"),
    [({}, 5, None), ({4: 0.5}, 3, None), ({4: 0.5}, 4, 0.5), ({4: 0.5, 8: 0.4}, 7, 0.5), ({4: 0.5, 8: 0.4}, 9, 0.4)],
)
def test_val_loss_at(val_loss: dict[int, float], step: int, expected: float | None) -> None:
    assert StepFacts(val_loss=val_loss).val_loss_at(step) == expected
