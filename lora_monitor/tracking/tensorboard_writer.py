"""Write lora-monitor's per-checkpoint metrics and image grid to TensorBoard, beside kohya's own logs.

kohya (`--logging_dir`) writes one run per launch, `logging_dir/<YYYYmmddHHMMSS>/network_train`.
lora-monitor writes a sibling run, `logging_dir/lora-monitor`, so `tensorboard --logdir <logging_dir>` shows
kohya's loss and lora-monitor's scores side by side. Scalars go under `lora-monitor/<metric>`, the image grid
under `lora-monitor/images`; the step is kohya's global step of the checkpoint.

The tensorboard package is optional (`pip install 'lora-monitor[tensorboard]'`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lora_monitor.errors import UserError

DEFAULT_RUN_NAME = "lora-monitor"
TAG_PREFIX = "lora-monitor"
IMAGES_TAG = f"{TAG_PREFIX}/images"
def image_row(images: list[Image.Image]) -> Image.Image:
    """The images side by side, left to right, as one RGB image (top-aligned, black where heights differ)."""
    if not images:
        raise ValueError("image_row needs at least one image")
    rgb = [image.convert("RGB") for image in images]
    row = Image.new("RGB", (sum(image.width for image in rgb), max(image.height for image in rgb)))
    x = 0
    for image in rgb:
        row.paste(image, (x, 0))
        x += image.width
    return row


class TensorBoardWriter:
    """One TensorBoard run of lora-monitor's results, `logging_dir / run_name`; flushed after every row."""

    def __init__(self, logging_dir: Path, run_name: str = DEFAULT_RUN_NAME) -> None:
        from torch.utils.tensorboard import SummaryWriter as writer_class

        self.run_dir = Path(logging_dir) / run_name
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or exc
            raise UserError(f"cannot create the TensorBoard folder {self.run_dir}: {reason}") from exc
        self._writer: Any = writer_class(log_dir=str(self.run_dir))

    def add_row(self, step: int, metrics: dict[str, float | None],
                images: list[Image.Image] | None = None) -> None:
        """Log one checkpoint: each metric as `lora-monitor/<name>` at `step` (kohya's global step).

        Metrics that are None or NaN (not computed for this checkpoint) are left out, not drawn as gaps.
        `images`, the checkpoint's generated images, are logged as one row under `lora-monitor/images`.
        """
        if self._writer is None:
            raise RuntimeError(f"the TensorBoard writer of {self.run_dir} is already closed")
        for name, value in metrics.items():
            if value is None or math.isnan(value):
                continue
            self._writer.add_scalar(f"{TAG_PREFIX}/{name}", float(value), global_step=step)
        if images:
            grid = np.asarray(image_row(images), dtype=np.uint8)
            self._writer.add_image(IMAGES_TAG, grid, global_step=step, dataformats="HWC")
        # flush now so a TensorBoard already watching the folder shows the checkpoint during training
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; calling it again does nothing."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
