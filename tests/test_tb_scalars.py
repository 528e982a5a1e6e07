"""tb_scalars: kohya's TensorBoard scalars, written here with torch's SummaryWriter (what accelerate uses)."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from lora_monitor import tb_scalars
from lora_monitor.tb_scalars import learning_rate_at, read_scalars
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


def approx(scalars: dict[str, dict[int, float]]) -> dict[str, object]:
    return {tag: pytest.approx(values, rel=1e-6) for tag, values in scalars.items()}  # stored as float32


def test_reads_the_fixture_tags_from_kohyas_layout(tmp_path: Path) -> None:
    expected = fixture_scalars()
    assert set(expected) == {"loss/current", "loss/average", "lr/textencoder", "lr/unet", "lr/group1",
                             "loss/epoch_average"}
    write_run(tmp_path / "logs" / "20261126211501" / "network_train", expected)
    scalars = read_scalars(tmp_path / "logs")
    assert scalars == approx(expected)
    assert learning_rate_at(scalars, 3) == pytest.approx(1e-4)


def test_newest_run_wins_and_since_skips_older_runs(tmp_path: Path) -> None:
    old, new = tmp_path / "20260101000000" / "network_train", tmp_path / "20260102000000" / "network_train"
    write_run(new, {"lr/unet": {1: 2e-4}})
    write_run(old, {"lr/unet": {1: 1e-4}, "lr/textencoder": {1: 5e-5}})
    now = time.time()
    for path in old.iterdir():
        os.utime(path, (now - 3600, now - 3600))  # written an hour ago, even though created last here
    assert read_scalars(tmp_path) == approx({"lr/unet": {1: 2e-4}})
    assert read_scalars(tmp_path, since=now - 60) == approx({"lr/unet": {1: 2e-4}})
    for path in new.iterdir():
        os.utime(path, (now - 7200, now - 7200))
    assert read_scalars(tmp_path, since=now - 60) == {}


def test_event_files_directly_in_logging_dir(tmp_path: Path) -> None:
    write_run(tmp_path, {"loss/average": {1: 1.5, 2: 1.25}})
    assert read_scalars(tmp_path) == approx({"loss/average": {1: 1.5, 2: 1.25}})


def test_nothing_to_read(tmp_path: Path) -> None:
    assert read_scalars(tmp_path) == {}
    assert read_scalars(tmp_path / "missing") == {}


def test_missing_tensorboard_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    write_run(tmp_path / "run", {"lr/unet": {1: 1e-4}})
    monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing.event_accumulator", None)
    monkeypatch.setattr(tb_scalars, "_warned_missing", False)
    with caplog.at_level(logging.WARNING, logger="lora_monitor.tb_scalars"):
        assert read_scalars(tmp_path) == {}
        assert read_scalars(tmp_path) == {}
    assert len(caplog.records) == 1
    assert "pip install tensorboard" in caplog.records[0].message


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
    assert learning_rate_at(scalars, step) == expected


def test_lora_monitor_run_beside_kohya_is_not_read(tmp_path: Path) -> None:
    """lora-monitor writes its own run into kohya's logging folder; the trainer's values stay kohya's."""
    from torch.utils.tensorboard import SummaryWriter

    from lora_monitor.tb_writer import TensorBoardWriter

    kohya = SummaryWriter(str(tmp_path / "20261126211501" / "network_train"))
    kohya.add_scalar("lr/unet", 1e-4, 2)
    kohya.close()
    ours = TensorBoardWriter(tmp_path)
    ours.add_row(2, {"eval_score": 0.5})
    ours.close()
    scalars = read_scalars(tmp_path)
    assert learning_rate_at(scalars, 2) == pytest.approx(1e-4)
    assert not any(tag.startswith("lora-monitor") for tag in scalars)
