"""Memorisation: how close a generated image comes to a training (reference) image, in pixels.

The criterion is Carlini et al. 2023, "Extracting Training Data from Diffusion Models" (USENIX Security), as
we read it: both images with pixel values in [0, 1], split into 4×4 = 16 non-overlapping tiles; per tile the
normalised ℓ2 distance ‖a − b‖₂ / √d (d = the tile's number of values: pixels × 3 channels, i.e. the RMS
difference); the pair's distance is the LARGEST tile distance; an image counts as extracted (a copy) below
δ = 0.15. The max over tiles is what makes it fit garments on white: the background tiles of any two product
photos are equal and would pull a whole-image ℓ2 towards 0, while the tile holding the most garment decides
here. A generated image's copy distance is the smallest over the references. No learned model is needed, so
the threshold means the same for every base model (SSCD features, Somepalli et al. 2023, would need weights
that cannot be shipped here and a threshold tuned on natural photos).

Three departures, each making the test catch near-copies that plain aligned pixels miss, and why:

- Size: both images are compared at 64×64 (tiles of 16×16 px). Small enough that re-encoding noise and
  resampling average out; large enough that a tile is ~6 % of the garment's width, so a different cut shows.
- Horizontal flips: a mirrored copy is far in aligned pixels, so each reference is also compared mirrored
  (kohya's `--flip_aug` trains on exactly such mirrors).
- Shift and scale: a copy a few percent smaller or moved is far in aligned pixels (3 % shift ≈ 0.3 here).
  Each image is also compared "framed": cropped to the bounding box of what differs from its border colour
  (the garment), padded to a square with that colour, resized to 64×64 — which undoes shift and scale
  exactly, the way a product photo is framed. The unframed comparison stays (the min of the two is taken),
  for scenes where the border is not background. Both use a ±1 px (±1.6 %) shift search for what remains.

The default threshold COPY_THRESHOLD = 0.15 is Carlini's δ; tests/evaluation/test_memorisation.py checks it
on drawn garments: JPEG re-encodes, colour shifts, flips, 3–5 % shifts and scales of a reference stay below
≈0.10, while different garments of the same kind (other cut, length, colour or pattern) on the same white
background are above ≈0.18. Limits: a garment that fills only a sliver of its tile (a ring on a large
white page) may pass for a different one of similar size; any tiny image is compared at 64×64 anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from lora_monitor.evaluation.references import to_rgb_on_white

COPY_THRESHOLD = 0.15  # Carlini et al. 2023's δ for the tiled, normalised ℓ2 distance
COMPARE_SIZE = 64
GRID = 4  # 4×4 = 16 tiles
SHIFT_PX = 1
_FOREGROUND_TOL = 0.15  # a pixel is garment when a channel differs from the border colour by more (0..1)
_FRAME_MARGIN = 0.05  # framed view: 5 % of the garment's longer side around it


def _as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def _border_colour(a: np.ndarray) -> np.ndarray:
    """Median colour of the outermost pixels: the background of a product photo."""
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return np.median(border, axis=0)


def _foreground_box(a: np.ndarray, background: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1) of the pixels that differ from the background; None when (almost) none do.

    A row or column counts only with at least 1 % of its pixels in the foreground, so JPEG ringing or a stray
    speck does not widen the box.
    """
    mask = np.abs(a - background).max(axis=2) > _FOREGROUND_TOL
    h, w = mask.shape
    cols = np.nonzero(mask.sum(axis=0) >= max(1, 0.01 * h))[0]
    rows = np.nonzero(mask.sum(axis=1) >= max(1, 0.01 * w))[0]
    if len(cols) == 0 or len(rows) == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _framed(rgb: Image.Image, size: int) -> np.ndarray:
    """The image cropped to its garment's box (plus a margin), squared with the border colour, size × size."""
    a = _as_array(rgb)
    background = _border_colour(a)
    box = _foreground_box(a, background)
    if box is None:
        return _as_array(rgb.resize((size, size), Image.Resampling.BOX))
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * _FRAME_MARGIN)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    fill = tuple(int(round(float(c) * 255)) for c in background)
    # Paste onto a canvas of the border colour so a box reaching past the edge reads background, not black.
    canvas = Image.new("RGB", (rgb.width * 3, rgb.height * 3), fill)
    canvas.paste(rgb, (rgb.width, rgb.height))
    crop = (cx - side / 2 + rgb.width, cy - side / 2 + rgb.height, cx + side / 2 + rgb.width,
            cy + side / 2 + rgb.height)
    return _as_array(canvas.resize((size, size), Image.Resampling.BOX, box=crop))


def _views(image: Image.Image, size: int) -> np.ndarray:
    """(2, size, size, 3): the whole image and its framed garment, values in [0, 1]."""
    rgb = to_rgb_on_white(image)
    whole = _as_array(rgb.resize((size, size), Image.Resampling.BOX))
    return np.stack([whole, _framed(rgb, size)])


def _shifts(a: np.ndarray, px: int) -> np.ndarray:
    """(k, h, w, 3): `a` moved by every (dx, dy) in [−px, px]², edges repeated into the gap."""
    if px == 0:
        return a[None]
    h, w, _ = a.shape
    padded = np.pad(a, ((px, px), (px, px), (0, 0)), mode="edge")
    return np.stack([
        padded[px + dy : px + dy + h, px + dx : px + dx + w]
        for dy in range(-px, px + 1)
        for dx in range(-px, px + 1)
    ])


def tiled_distance(a: np.ndarray, b: np.ndarray, grid: int = GRID) -> np.ndarray:
    """Carlini's distance of image arrays (..., h, w, c) in [0, 1]: the max over grid×grid tiles of the RMS.

    Broadcasts over the leading axes; h and w must be multiples of `grid`.
    """
    *lead, h, w, c = np.broadcast_shapes(a.shape, b.shape)
    if h % grid or w % grid:
        raise ValueError(f"image size {w}x{h} is not a multiple of the {grid}x{grid} tile grid")
    sq = (np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)) ** 2
    tiles = sq.reshape(*lead, grid, h // grid, grid, w // grid, c).mean(axis=(-4, -2, -1))
    return np.sqrt(tiles.reshape(*lead, grid * grid).max(axis=-1))


class CopyIndex:
    """The references prepared once (both views, mirrored too); `distances()` per checkpoint's images."""

    def __init__(self, references: Sequence[Image.Image], size: int = COMPARE_SIZE, shift_px: int = SHIFT_PX):
        if not references:
            raise ValueError("copy distance needs at least one reference image")
        self.size = size
        self.shift_px = shift_px
        views = np.stack([_views(r, size) for r in references])  # (R, 2, s, s, 3)
        self._refs = np.stack([views, views[:, :, :, ::-1]], axis=2)  # (R, view, mirror, s, s, 3)

    def distance(self, image: Image.Image) -> float:
        """Smallest tiled distance of `image` to any reference (either view, mirrored or not, shifted ±px)."""
        views = _views(image, self.size)
        best = np.inf
        for v in range(2):
            moved = _shifts(views[v], self.shift_px)  # (k, s, s, 3)
            d = tiled_distance(moved[:, None, None], self._refs[None, :, v])  # (k, R, mirror)
            best = min(best, float(d.min()))
        return best

    def distances(self, images: Sequence[Image.Image]) -> list[float]:
        return [self.distance(im) for im in images]


def copy_distances(generated: Sequence[Image.Image], references: Sequence[Image.Image]) -> list[float]:
    """Per generated image, its distance to the nearest reference (lower = closer to a copy; 0 = identical).

    Images may be any mode and size (RGBA is composited on white). See the module docstring for the criterion.
    """
    return CopyIndex(references).distances(generated)


def count_copies(distances: Sequence[float], threshold: float = COPY_THRESHOLD) -> int:
    """How many distances are below `threshold`: the images that count as copies of a reference."""
    return sum(1 for d in distances if d < threshold)
