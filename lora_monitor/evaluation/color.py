"""Colour distance between two sets of images, in CIELAB, independent of layout.

Method (sliced Wasserstein-1 over Lab pixels):

1. Every image is converted from sRGB to CIELAB (D65), downscaled first so its longer side is at most
   `MAX_SIDE` px (box filter: colours are averaged, never invented).
2. Near-white, low-chroma pixels (L* >= `BACKGROUND_MIN_L` and C*ab <= `BACKGROUND_MAX_CHROMA`) are the
   studio background and are dropped, so a garment photographed with more or less white around it keeps its
   score. If fewer than `MIN_FOREGROUND_FRACTION` of the pixels remain (a white garment on white), all pixels
   are kept.
3. The remaining pixels are projected on `N_PROJECTIONS` fixed unit directions of Lab space (a Fibonacci
   lattice on the half sphere: deterministic, no random seed) and each projection is summarised by
   `N_QUANTILES` quantiles. These (projections x quantiles) arrays are the per-image "colour stats", which
   can be cached.
4. A set of images is the equal-weight mixture of its images; the distance between two sets is the mean over
   directions of the 1-D Wasserstein-1 distance between the projected mixtures, times 2.

Why times 2: for a direction spread uniformly over the sphere the mean of |cos| is 1/2, so with the factor a
uniform shift of every pixel by a Lab vector of length d (a colour difference of ΔE*76 = d) scores d.
The result is therefore in ΔE-like units: 0 = the same colour distribution, 10 ≈ every pixel shifted by
ΔE 10; the largest possible value is about 200 (black vs saturated colours). Pixel positions play no role,
so the same garment cut into tiles and shuffled scores 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

MAX_SIDE = 256
BACKGROUND_MIN_L = 90.0
BACKGROUND_MAX_CHROMA = 8.0
MIN_FOREGROUND_FRACTION = 0.01
N_PROJECTIONS = 64
N_QUANTILES = 128
# Bump when anything above changes: cached reference stats are keyed by it.
COLOR_STATS_VERSION = (
    f"swd1-{MAX_SIDE}-{BACKGROUND_MIN_L}-{BACKGROUND_MAX_CHROMA}-{MIN_FOREGROUND_FRACTION}-{N_PROJECTIONS}-{N_QUANTILES}"
)

# sRGB (IEC 61966-2-1) linear RGB -> CIE XYZ, D65 white.
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_WHITE_D65 = _RGB_TO_XYZ.sum(axis=1)  # XYZ of sRGB white (1, 1, 1): (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0
_UNIFORM_SHIFT_SCALE = 2.0  # 1 / E|cos| for directions uniform on the sphere (see module docstring)


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Convert sRGB colours to CIELAB (D65, 2° observer).

    `rgb` has shape (..., 3): uint8 in 0..255, or floats in [0, 1]. Returns float64 (..., 3) with
    L* in [0, 100] and a*, b* roughly in [-128, 128].
    """
    arr = np.asarray(rgb)
    if arr.shape[-1:] != (3,):
        raise ValueError(f"expected an array of shape (..., 3), got {arr.shape}")
    c = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE_D65
    f = np.where(xyz > _DELTA**3, np.cbrt(xyz), xyz / (3 * _DELTA**2) + 4.0 / 29.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def foreground_lab(image: Image.Image) -> np.ndarray:
    """Lab values (n, 3) of the pixels that are not near-white background (see module docstring)."""
    from lora_monitor.evaluation.references import to_rgb_on_white

    rgb = to_rgb_on_white(image)  # transparent pixels are white, as for image files
    if max(rgb.size) > MAX_SIDE:
        scale = MAX_SIDE / max(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BOX)
    lab = srgb_to_lab(np.asarray(rgb, dtype=np.uint8)).reshape(-1, 3)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    keep = ~((lab[:, 0] >= BACKGROUND_MIN_L) & (chroma <= BACKGROUND_MAX_CHROMA))
    if keep.sum() < max(1, MIN_FOREGROUND_FRACTION * len(lab)):
        return lab
    return lab[keep]


def projection_directions(n: int = N_PROJECTIONS) -> np.ndarray:
    """`n` unit vectors (n, 3) spread evenly over the upper half sphere (Fibonacci lattice).

    A half sphere suffices because a direction and its opposite give the same 1-D distance.
    """
    i = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - i / n  # uniform in (0, 1): equal-area bands of the half sphere
    r = np.sqrt(1.0 - z * z)
    phi = i * np.pi * (3.0 - np.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


_DIRECTIONS = projection_directions()


def _sorted_quantiles(values: np.ndarray, k: int) -> np.ndarray:
    """The k quantiles at levels (j + 0.5) / k of each row of `values` (rows are sorted in place).

    Uses the step quantile function (smallest sample whose CDF reaches the level) with integer arithmetic,
    so duplicating every sample leaves the result exactly unchanged.
    """
    values.sort(axis=1)
    m = values.shape[1]
    j = np.arange(k)
    idx = ((2 * j + 1) * m + 2 * k - 1) // (2 * k) - 1
    return values[:, idx]


def lab_stats(lab: np.ndarray) -> np.ndarray:
    """Colour stats (N_PROJECTIONS, N_QUANTILES) float32 of a set of Lab pixels (n, 3), n >= 1."""
    if lab.ndim != 2 or lab.shape[1] != 3 or len(lab) == 0:
        raise ValueError(f"expected Lab pixels of shape (n >= 1, 3), got {lab.shape}")
    projected = np.ascontiguousarray((lab @ _DIRECTIONS.T).T)
    return _sorted_quantiles(projected, N_QUANTILES).astype(np.float32)


def color_stats(image: Image.Image) -> np.ndarray:
    """Colour stats of one image: projected-Lab quantiles (N_PROJECTIONS, N_QUANTILES), float32."""
    return lab_stats(foreground_lab(image))


def pool_stats(stats: Sequence[np.ndarray]) -> np.ndarray:
    """Colour stats of the equal-weight mixture of several images' stats (same shape as one)."""
    if len(stats) == 0:
        raise ValueError("cannot pool the colour stats of zero images")
    if len(stats) == 1:
        return np.asarray(stats[0], dtype=np.float32)
    joined = np.concatenate([np.asarray(s, dtype=np.float32) for s in stats], axis=1)
    return _sorted_quantiles(joined, N_QUANTILES)


def stats_distance(gen_stats: np.ndarray, ref_stats: np.ndarray) -> float:
    """Distance in ΔE-like units (>= 0) between two pooled colour stats (see module docstring)."""
    if gen_stats.shape != ref_stats.shape:
        raise ValueError(f"colour stats shapes differ: {gen_stats.shape} vs {ref_stats.shape}")
    diff = np.abs(gen_stats.astype(np.float64) - ref_stats.astype(np.float64))
    return float(_UNIFORM_SHIFT_SCALE * diff.mean())


def sliced_wasserstein(lab_a: np.ndarray, lab_b: np.ndarray) -> float:
    """Colour distance (ΔE-like units) between two sets of Lab pixels, each of shape (n, 3)."""
    return stats_distance(lab_stats(lab_a), lab_stats(lab_b))


def color_distance(gen_images: Sequence[Image.Image], ref_images: Sequence[Image.Image]) -> float:
    """color_loss between generated and reference images: 0 = same colours, in ΔE-like units (>= 0)."""
    gen = pool_stats([color_stats(im) for im in gen_images])
    ref = pool_stats([color_stats(im) for im in ref_images])
    return stats_distance(gen, ref)
