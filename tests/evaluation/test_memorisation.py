"""Copy distance (Carlini et al. 2023's tiled ℓ2): near-copies of a reference are flagged, other garments not.

The garments are the demo's drawn dresses (lora_monitor.demo.dataset) with designed differences: cut,
length, colour, pattern — all on the same white background, the case where whole-image ℓ2 cannot tell them
apart. The default threshold COPY_THRESHOLD must separate the two tables below.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_monitor.config import MetricsConfig, parse_config
from lora_monitor.demo.dataset import DressPose, draw_dress
from lora_monitor.errors import UserError
from lora_monitor.evaluation.memorisation import (
    COPY_THRESHOLD,
    CopyIndex,
    copy_distances,
    count_copies,
    tiled_distance,
)

SIZE = 256
BASE = DressPose(cx=0.5, top=0.1, height=0.82, shoulder=0.30, waist=0.20, hem=0.62, tilt=0.0, rgb=(200, 24, 36))
DESIGNS = {
    "red dress": BASE,
    "sheath": dataclasses.replace(BASE, hem=0.32, waist=0.18),
    "wide a-line": dataclasses.replace(BASE, hem=0.85),
    "short": dataclasses.replace(BASE, height=0.55, top=0.2),
    "navy": dataclasses.replace(BASE, rgb=(30, 40, 110)),
    "asymmetric hem": dataclasses.replace(BASE, tilt=0.08),
    "broad shoulders": dataclasses.replace(BASE, shoulder=0.42, waist=0.28),
    "pink": dataclasses.replace(BASE, rgb=(240, 120, 150)),
}


def _pattern(img: Image.Image, kind: str, period: int = 12) -> Image.Image:
    """Paint stripes or checks over the garment (pixels not white): a textured fabric."""
    a = np.asarray(img).copy()
    garment = np.abs(a.astype(int) - 255).max(axis=2) > 40
    yy, xx = np.mgrid[: a.shape[0], : a.shape[1]]
    half = period // 2
    band = {"stripes": (yy // half) % 2 == 0, "vertical stripes": (xx // half) % 2 == 0,
            "checks": ((yy // half) + (xx // half)) % 2 == 0}[kind]
    a[band & garment] = (250, 230, 200)
    return Image.fromarray(a)


@functools.cache
def garments() -> dict[str, Image.Image]:
    drawn = {name: draw_dress(pose, SIZE) for name, pose in DESIGNS.items()}
    for kind in ("stripes", "vertical stripes", "checks"):
        drawn[f"red dress, {kind}"] = _pattern(drawn["red dress"], kind)
    return drawn


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def colour_shift(img: Image.Image, delta: tuple[int, int, int] = (10, -8, 6)) -> Image.Image:
    a = np.asarray(img, dtype=np.int16) + np.array(delta)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def shift(img: Image.Image, dx: float, dy: float) -> Image.Image:
    out = Image.new("RGB", img.size, (255, 255, 255))
    out.paste(img, (round(dx * img.width), round(dy * img.height)))
    return out


def scale(img: Image.Image, factor: float) -> Image.Image:
    small = img.resize((round(img.width * factor), round(img.height * factor)), Image.Resampling.BICUBIC)
    out = Image.new("RGB", img.size, (255, 255, 255))
    out.paste(small, ((img.width - small.width) // 2, (img.height - small.height) // 2))
    return out


def flip(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def on_transparent(img: Image.Image) -> Image.Image:
    """The same picture as RGBA with a transparent (not white) background."""
    rgba = img.convert("RGBA")
    a = np.asarray(rgba).copy()
    white = (a[..., :3] == 255).all(axis=2)
    a[white] = (0, 0, 0, 0)
    return Image.fromarray(a, "RGBA")


NEAR_COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "itself": lambda im: im,
    "JPEG quality 60": lambda im: jpeg(im, 60),
    "colour shift (+10, -8, +6)": colour_shift,
    "horizontal flip": flip,
    "shift 3 % right": lambda im: shift(im, 0.03, 0.0),
    "shift 5 % right and up": lambda im: shift(im, 0.05, -0.03),
    "scale 95 %": lambda im: scale(im, 0.95),
    "scale 105 %": lambda im: scale(im, 1.05),
    "resized to 512 px": lambda im: im.resize((512, 512), Image.Resampling.LANCZOS),
    "RGBA on transparent": on_transparent,
    "flip + shift + scale + JPEG": lambda im: jpeg(scale(shift(flip(im), 0.03, 0.0), 0.96), 75),
}


@pytest.mark.parametrize("reference", ["red dress", "asymmetric hem", "navy", "red dress, stripes",
                                       "red dress, checks"])
@pytest.mark.parametrize("augment", list(NEAR_COPIES))
def test_near_copies_of_a_reference_are_flagged(reference: str, augment: str) -> None:
    ref = garments()[reference]
    (distance,) = copy_distances([NEAR_COPIES[augment](ref)], [ref])
    assert distance < COPY_THRESHOLD
    assert distance < 0.1  # with a margin: the threshold is not tuned to the last augmentation


@pytest.mark.parametrize("a, b", list(itertools.combinations(garments(), 2)))
def test_different_garments_of_the_same_kind_are_not_copies(a: str, b: str) -> None:
    drawn = garments()
    (distance,) = copy_distances([drawn[a]], [drawn[b]])
    assert distance > COPY_THRESHOLD
    assert distance > 0.18


def test_copy_distance_is_the_nearest_reference() -> None:
    drawn = garments()
    refs = [drawn["sheath"], drawn["navy"], drawn["red dress"]]
    generated = [jpeg(drawn["red dress"], 70), drawn["pink"], Image.new("RGB", (SIZE, SIZE), "white")]
    index = CopyIndex(refs)
    each = [[CopyIndex([r]).distance(g) for r in refs] for g in generated]
    distances = index.distances(generated)
    assert distances == pytest.approx([min(row) for row in each])
    assert count_copies(distances) == 1  # only the re-encoded red dress
    assert distances[2] > 0.5  # an empty white picture copies nothing: the garment's tile decides


@pytest.mark.parametrize(
    "distances, threshold, expected",
    [([], COPY_THRESHOLD, 0), ([0.0, 0.2, 0.149], 0.15, 2), ([0.15], 0.15, 0), ([0.3, 0.4], 0.5, 2)],
)
def test_count_copies(distances: list[float], threshold: float, expected: int) -> None:
    assert count_copies(distances, threshold) == expected


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), 0.0),
        (np.zeros((8, 8, 3)), np.ones((8, 8, 3)), 1.0),  # normalised: black vs white is 1 whatever the size
        (np.zeros((64, 64, 3)), np.ones((64, 64, 3)), 1.0),
        # one tile of 16 fully different: the max over tiles is 1 although the whole-image RMS is 0.25
        (np.zeros((8, 8, 3)), np.pad(np.ones((2, 2, 3)), ((0, 6), (0, 6), (0, 0))), 1.0),
        (np.zeros((8, 8, 3)), np.full((8, 8, 3), 0.1), 0.1),
    ],
)
def test_tiled_distance(a: np.ndarray, b: np.ndarray, expected: float) -> None:
    assert float(tiled_distance(a, b)) == pytest.approx(expected, abs=1e-6)


def test_tiled_distance_rejects_sizes_off_the_grid() -> None:
    with pytest.raises(ValueError, match="tile grid"):
        tiled_distance(np.zeros((6, 6, 3)), np.zeros((6, 6, 3)))


def test_config_default_is_the_calibrated_threshold() -> None:
    assert MetricsConfig().copy_threshold == COPY_THRESHOLD


@pytest.mark.parametrize("value", [0, -0.1, 1.5, "nan"])
def test_config_rejects_a_copy_threshold_out_of_range(tmp_path: Path, value: object) -> None:
    text = f"[metrics]\ncopy_threshold = {value}\n"
    with pytest.raises(UserError, match="metrics.copy_threshold"):
        parse_config(text, tmp_path / "c.toml")


def test_copy_distances_needs_a_reference() -> None:
    with pytest.raises(ValueError, match="at least one reference"):
        copy_distances([Image.new("RGB", (8, 8))], [])
