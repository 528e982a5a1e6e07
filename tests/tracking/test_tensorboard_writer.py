"""TensorBoardWriter: scalars and image rows read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from PIL import Image

from lora_monitor.tracking.tensorboard_writer import IMAGES_TAG, TensorBoardWriter, image_row

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator").EventAccumulator


def _accumulate(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})  # 0: keep everything
    acc.Reload()
    return acc


def _kohya_run(logging_dir: Path) -> Path:
    """A run laid out like kohya's: logging_dir/<YYYYmmddHHMMSS>/network_train with a loss scalar."""
    from torch.utils.tensorboard import SummaryWriter

    run = logging_dir / "20261126211501" / "network_train"
    writer = SummaryWriter(log_dir=str(run))
    writer.add_scalar("loss/current", 1.06, global_step=1)
    writer.close()
    return run


def _solid(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_two_rows_read_back_beside_kohya_run(tmp_path: Path) -> None:
    logging_dir = tmp_path / "logs"
    kohya_run = _kohya_run(logging_dir)
    writer = TensorBoardWriter(logging_dir)
    names = ("visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score")
    rows = [
        (10, dict(zip(names, (0.5, 0.25, 12.0, 0.3, 0.7), strict=True)),
         [_solid((255, 0, 0)), _solid((0, 0, 255))]),
        (20, dict(zip(names, (0.4, 0.2, 9.5, 0.31, 0.8), strict=True)),
         [_solid((0, 255, 0)), _solid((255, 255, 255))]),
    ]
    for step, metrics, images in rows:
        writer.add_row(step, metrics, images)
    writer.close()

    assert writer.run_dir == logging_dir / "lora-monitor"
    assert writer.run_dir.parent == kohya_run.parent.parent  # siblings under one --logdir
    acc = _accumulate(writer.run_dir)
    for name in names:
        events = acc.Scalars(f"lora-monitor/{name}")
        assert [e.step for e in events] == [10, 20]
        assert [e.value for e in events] == pytest.approx([rows[0][1][name], rows[1][1][name]])
    assert "loss/current" not in acc.Tags()["scalars"]  # kohya's run stays its own

    images = acc.Images(IMAGES_TAG)
    assert [e.step for e in images] == [10, 20]
    first = Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB")
    assert first.size == (16, 6)  # two 8x6 images in one row
    assert first.getpixel((0, 0)) == (255, 0, 0)
    assert first.getpixel((15, 5)) == (0, 0, 255)


def test_flushed_before_close(tmp_path: Path) -> None:
    writer = TensorBoardWriter(tmp_path)
    writer.add_row(5, {"eval_score": 0.6})
    try:
        assert [e.value for e in _accumulate(writer.run_dir).Scalars("lora-monitor/eval_score")] == \
            pytest.approx([0.6])
    finally:
        writer.close()


def test_missing_metrics_left_out_and_no_images(tmp_path: Path) -> None:
    writer = TensorBoardWriter(tmp_path, run_name="custom")
    writer.add_row(3, {"eval_score": 0.9, "clip_t": None, "color_loss": math.nan}, images=None)
    writer.close()
    tags = _accumulate(tmp_path / "custom").Tags()
    assert tags["scalars"] == ["lora-monitor/eval_score"]
    assert tags["images"] == []


def test_closed_writer_refuses_rows(tmp_path: Path) -> None:
    writer = TensorBoardWriter(tmp_path)
    writer.close()
    writer.close()  # a second close is harmless
    with pytest.raises(RuntimeError, match="closed"):
        writer.add_row(1, {"eval_score": 0.5})


@pytest.mark.parametrize("sizes, expected", [
    ([(4, 4)], (4, 4)),
    ([(4, 4), (6, 4), (2, 4)], (12, 4)),
    ([(4, 2), (4, 5)], (8, 5)),  # mixed heights: the tallest sets the row height
])
def test_image_row_size(sizes: list[tuple[int, int]], expected: tuple[int, int]) -> None:
    row = image_row([_solid((10, 20, 30), size) for size in sizes])
    assert row.size == expected
    assert row.mode == "RGB"


def test_image_row_converts_modes_and_keeps_order() -> None:
    gray = Image.new("L", (2, 2), 128)
    rgba = Image.new("RGBA", (2, 2), (0, 200, 0, 255))
    row = image_row([gray, rgba])
    assert row.getpixel((0, 0)) == (128, 128, 128)
    assert row.getpixel((3, 1)) == (0, 200, 0)


def test_image_row_needs_images() -> None:
    with pytest.raises(ValueError):
        image_row([])
