"""Colour distance: CIELAB conversion, background masking, layout invariance, and that it means colour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from lora_monitor.evaluation.color import (
    N_PROJECTIONS,
    N_QUANTILES,
    color_distance,
    color_stats,
    foreground_lab,
    pool_stats,
    projection_directions,
    sliced_wasserstein,
    srgb_to_lab,
)

RED = (200, 30, 40)
NAVY = (30, 40, 110)
OLIVE = (110, 120, 40)


Color = tuple[int, int, int]


def garment(color: Color, size: int = 64, trim: Color | None = (240, 200, 60)) -> Image.Image:
    """A dress on white: bodice + flared skirt in `color`, a belt in `trim`, darker shadow folds."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    s = size / 64
    d.polygon([(24 * s, 6 * s), (40 * s, 6 * s), (42 * s, 26 * s), (22 * s, 26 * s)], fill=color)
    d.polygon([(22 * s, 26 * s), (42 * s, 26 * s), (54 * s, 60 * s), (10 * s, 60 * s)], fill=color)
    shade = tuple(int(c * 0.7) for c in color)
    for x in (20, 30, 40):
        d.line([(32 * s, 28 * s), (x * s, 58 * s)], fill=shade, width=max(1, int(2 * s)))
    if trim is not None:
        d.rectangle([22 * s, 24 * s, 42 * s, 27 * s], fill=trim)
    return img


def hue_shift(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate the hue of every pixel (white stays white: its saturation is 0)."""
    h, s, v = img.convert("HSV").split()
    shift = round(degrees / 360 * 256)
    h = h.point(lambda x: (x + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def shuffle_tiles(img: Image.Image, tiles: int = 4, seed: int = 1) -> Image.Image:
    w, h = img.size
    tw, th = w // tiles, h // tiles
    boxes = [(x * tw, y * th, (x + 1) * tw, (y + 1) * th) for y in range(tiles) for x in range(tiles)]
    order = np.random.default_rng(seed).permutation(len(boxes))
    out = Image.new("RGB", img.size)
    for dst, src in zip(boxes, order, strict=True):
        out.paste(img.crop(boxes[src]), dst[:2])
    return out


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((255, 255, 255), (100.0, 0.0, 0.0)),
        ((0, 0, 0), (0.0, 0.0, 0.0)),
        ((255, 0, 0), (53.24, 80.09, 67.20)),
        ((0, 255, 0), (87.73, -86.18, 83.18)),
        ((0, 0, 255), (32.30, 79.19, -107.86)),
        ((128, 128, 128), (53.59, 0.0, 0.0)),
        ((255, 255, 0), (97.14, -21.55, 94.48)),
    ],
)
def test_srgb_to_lab_reference_values(rgb: tuple[int, int, int], lab: tuple[float, float, float]) -> None:
    got = srgb_to_lab(np.array([rgb], dtype=np.uint8))[0]
    np.testing.assert_allclose(got, lab, atol=0.02)


def test_srgb_to_lab_accepts_floats_and_any_leading_shape() -> None:
    rgb8 = np.random.default_rng(0).integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
    np.testing.assert_allclose(srgb_to_lab(rgb8), srgb_to_lab(rgb8 / 255.0), atol=1e-9)
    with pytest.raises(ValueError):
        srgb_to_lab(np.zeros((4, 4)))


@pytest.mark.parametrize("color", [RED, NAVY, OLIVE, (250, 250, 250)])
def test_an_image_against_itself_or_its_copies_is_zero(color: tuple[int, int, int]) -> None:
    img = garment(color)
    assert color_distance([img], [img]) == 0.0
    assert color_distance([img, img, img], [img]) < 1e-5
    assert color_distance([img], [img.copy(), img.copy()]) < 1e-5


def test_mixture_order_does_not_matter_and_distance_is_symmetric() -> None:
    a, b = garment(RED), garment(NAVY)
    assert color_distance([a, b], [b, a]) < 1e-5
    assert color_distance([a], [b]) == pytest.approx(color_distance([b], [a]), abs=1e-6)


def test_layout_does_not_matter_tiles_shuffled_score_near_zero() -> None:
    img = garment(RED)
    hue20 = color_distance([hue_shift(img, 20)], [img])
    shuffled = color_distance([shuffle_tiles(img)], [img])
    assert shuffled < 0.1 * hue20
    # Flipped and rotated garments are the same colours too.
    flipped = color_distance([img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(90)], [img])
    assert flipped < 0.1 * hue20


@pytest.mark.parametrize("color", [RED, NAVY, OLIVE])
def test_larger_hue_shift_scores_higher(color: tuple[int, int, int]) -> None:
    # The HSV round trip alone moves colours slightly: compare like with like.
    img = hue_shift(garment(color), 0)
    scores = [color_distance([hue_shift(img, deg)], [img]) for deg in (0, 20, 60)]
    assert scores[0] < 0.2 * scores[1]
    assert 0 < scores[1] < scores[2]
    assert scores[1] > 3.0  # a visible hue change is several ΔE


def test_darker_garment_scores_clearly_above_zero() -> None:
    img = garment(RED)
    darker = garment(tuple(int(c * 0.8) for c in RED), trim=tuple(int(c * 0.8) for c in (240, 200, 60)))
    whole_image = ImageEnhance.Brightness(img).enhance(0.8)
    assert color_distance([darker], [img]) > 5.0
    assert color_distance([whole_image], [img]) > 5.0


def test_white_background_around_the_garment_changes_little() -> None:
    img = garment(RED)
    hue20 = color_distance([hue_shift(img, 20)], [img])
    padded = Image.new("RGB", (128, 96), (255, 255, 255))
    padded.paste(img, (40, 20))
    assert color_distance([padded], [img]) < 0.1 * hue20
    # Garment drawn smaller on a bigger canvas (resampled edges) is still far closer than a hue change.
    small = Image.new("RGB", (96, 96), (255, 255, 255))
    small.paste(garment(RED, size=48), (10, 30))
    assert color_distance([small], [img]) < 0.5 * hue20


def test_uniform_lab_shift_scores_its_delta_e() -> None:
    rng = np.random.default_rng(0)
    lab = rng.normal([50, 20, 10], [10, 15, 15], size=(3000, 3))
    directions = np.vstack([np.eye(3), rng.normal(size=(5, 3))])
    for d in directions:
        shift = 10.0 * d / np.linalg.norm(d)
        assert sliced_wasserstein(lab, lab + shift) == pytest.approx(10.0, rel=0.03)


def test_background_is_masked_and_all_white_images_fall_back_to_all_pixels() -> None:
    img = garment(RED, trim=None)
    fg = foreground_lab(img)
    assert 0 < len(fg) < 64 * 64
    assert np.all(np.hypot(fg[:, 1], fg[:, 2]) > 8.0)  # only the red dress and its folds remain
    blank = Image.new("RGB", (32, 32), (255, 255, 255))
    assert len(foreground_lab(blank)) == 32 * 32
    assert color_distance([blank], [blank]) == 0.0
    assert color_distance([blank], [img]) > 30.0


def test_large_images_are_downscaled_consistently() -> None:
    small = garment(NAVY, size=64)
    big = small.resize((512, 512), Image.Resampling.NEAREST)  # same colours, 64x the pixels
    assert color_distance([big], [small]) < 0.1 * color_distance([hue_shift(small, 20)], [small])


def test_stats_shapes_determinism_and_pooling() -> None:
    a, b = color_stats(garment(RED)), color_stats(garment(NAVY))
    assert a.shape == (N_PROJECTIONS, N_QUANTILES) and a.dtype == np.float32
    np.testing.assert_array_equal(a, color_stats(garment(RED)))
    np.testing.assert_array_equal(pool_stats([a]), a)
    np.testing.assert_array_equal(pool_stats([a, a]), a)
    np.testing.assert_array_equal(pool_stats([a, b]), pool_stats([b, a]))
    with pytest.raises(ValueError):
        pool_stats([])


def test_projection_directions_are_unit_vectors_on_the_upper_half_sphere() -> None:
    d = projection_directions()
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-12)
    assert np.all(d[:, 2] > 0)
    assert len(np.unique(d.round(6), axis=0)) == len(d)
