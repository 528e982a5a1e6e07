"""The over-training signals of one checkpoint's images, routed by the image plan."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lora_monitor.evaluation.image_plan import build_plan
from lora_monitor.evaluation.memorisation import CopyIndex
from lora_monitor.evaluation.prompts import Prompt
from lora_monitor.evaluation.signals import overtraining_signals


def garment(colour: tuple[int, int, int], box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


class ScorerSpy:
    """Stands in for the scoring models: embeddings are each image's mean colour, alignment is counted."""

    def __init__(self) -> None:
        self.aligned: list[tuple[int, list[str]]] = []

    def text_alignment(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> float:
        self.aligned.append((len(images), list(prompts)))
        return 0.25

    def embed_visual(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([np.asarray(im, dtype=float).mean(axis=(0, 1)) + 1.0 for im in images])


RED, BLUE = garment((200, 0, 0), (16, 8, 48, 60)), garment((0, 0, 200), (8, 20, 56, 40))


@pytest.mark.parametrize(
    ("images", "holdout", "expected"),
    [
        # two seeds drew the same image: no diversity; the reference itself: a copy
        ([RED, RED], [], {"diversity": 0.0, "copies": 2.0}),
        ([RED, BLUE], [], {"copies": 1.0}),  # varied: diversity > 0
        ([BLUE, BLUE, RED], [Prompt("dress, back view")], {"clip_t_holdout": 0.25, "diversity": 0.0, "copies": 1.0}),
    ],
)
def test_signals_follow_the_plan(images: list[Image.Image], holdout: list[Prompt], expected: dict) -> None:
    spy = ScorerSpy()
    plan = build_plan([Prompt("dress, sks")], holdout, seeds_per_prompt=2, run_seed=0)
    values = overtraining_signals(spy, CopyIndex([RED]), 0.15, plan, images)
    for key, value in expected.items():
        assert values[key] == pytest.approx(value, abs=1e-9), key
    if len({im.tobytes() for im in images[:2]}) == 2:
        assert values["diversity"] > 0
    assert values["copy_distance"] == pytest.approx(0.0, abs=1e-9) or values["copies"] == 0
    assert spy.aligned == ([(1, ["dress, back view"])] if holdout else [])  # held-out images only


def test_no_holdout_no_second_seed_no_references() -> None:
    plan = build_plan([Prompt("dress")], [], seeds_per_prompt=1, run_seed=0)
    assert overtraining_signals(ScorerSpy(), None, 0.15, plan, [RED]) == {}


def test_images_must_match_the_plan() -> None:
    plan = build_plan([Prompt("dress")], [], seeds_per_prompt=2, run_seed=0)
    with pytest.raises(ValueError, match="1 images for a plan of 2"):
        overtraining_signals(ScorerSpy(), None, 0.15, plan, [RED])
