"""The demo's training set: small pictures of a red dress on white, drawn with PIL, in kohya's layout.

kohya's DreamBooth layout is `train_data_dir/<repeats>_<class>/<image>.png` with a caption file of the
same stem (`--caption_extension .txt`). A kohya sample-prompt file (`prompts.txt`) goes beside the image
folder: one prompt a line, options `--n` negative prompt, `--w`/`--h` size in pixels, `--d` seed,
`--s` steps, `--l` CFG scale; lines starting with `#` are comments.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

TRIGGER = "sks style"
CLASS_TOKEN = "dress"
DRESS_RGB = (200, 24, 36)
BACKGROUND_RGB = (255, 255, 255)
# Captions cycle through these; the sample prompts use the same wording so a checkpoint is asked for
# exactly what it was trained on.
CAPTIONS = (
    f"a photo of a red dress, {TRIGGER}",
    f"a red dress on a white background, {TRIGGER}",
    f"a photo of a sleeveless red dress, {TRIGGER}",
    f"a product photo of a red dress, {TRIGGER}",
)
_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges like a photo, not jagged pixels


@dataclass(frozen=True)
class DressPose:
    """Where and how big one dress is drawn, in fractions of the image side (0..1)."""

    cx: float
    top: float
    height: float
    shoulder: float
    waist: float
    hem: float
    tilt: float  # horizontal shift of the hem relative to the shoulders
    rgb: tuple[int, int, int]


def random_pose(rng: random.Random) -> DressPose:
    """A slightly varied dress pose; all values stay inside the frame."""
    scale = rng.uniform(0.85, 1.0)
    jitter = 10
    rgb = (
        min(255, max(0, DRESS_RGB[0] + rng.randint(-jitter, jitter))),
        min(255, max(0, DRESS_RGB[1] + rng.randint(-jitter, jitter))),
        min(255, max(0, DRESS_RGB[2] + rng.randint(-jitter, jitter))),
    )
    return DressPose(
        cx=0.5 + rng.uniform(-0.05, 0.05),
        top=0.08 + rng.uniform(0.0, 0.06),
        height=0.82 * scale,
        shoulder=0.30 * scale,
        waist=0.20 * scale * rng.uniform(0.9, 1.1),
        hem=0.62 * scale * rng.uniform(0.9, 1.1),
        tilt=rng.uniform(-0.04, 0.04),
        rgb=rgb,
    )


def draw_dress(pose: DressPose, size: int) -> Image.Image:
    """Draw one dress (straps, bodice, flared skirt, a few darker folds) on white; RGB, size x size."""
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND_RGB)
    d = ImageDraw.Draw(img)

    def px(x: float, y: float) -> tuple[float, float]:
        return (x * big, y * big)

    top = pose.top + 0.08 * pose.height  # straps take the first 8 % of the height
    waist_y = pose.top + 0.40 * pose.height
    hem_y = pose.top + pose.height
    hem_cx = pose.cx + pose.tilt
    bodice = [
        px(pose.cx - pose.shoulder / 2, top),
        px(pose.cx + pose.shoulder / 2, top),
        px(pose.cx + pose.waist / 2, waist_y),
        px(pose.cx - pose.waist / 2, waist_y),
    ]
    skirt = [
        px(pose.cx - pose.waist / 2, waist_y),
        px(pose.cx + pose.waist / 2, waist_y),
        px(hem_cx + pose.hem / 2, hem_y),
        px(hem_cx - pose.hem / 2, hem_y),
    ]
    d.polygon(bodice, fill=pose.rgb)
    d.polygon(skirt, fill=pose.rgb)
    strap_w = max(1, round(0.025 * big))
    for side in (-1, 1):
        x = pose.cx + side * pose.shoulder * 0.35
        d.line([px(x, pose.top), px(x, top)], fill=pose.rgb, width=strap_w)
    fold = tuple(int(c * 0.7) for c in pose.rgb)
    for k in (-1, 0, 1):
        d.line(
            [
                px(pose.cx + k * pose.waist * 0.25, waist_y + 0.05),
                px(hem_cx + k * pose.hem * 0.28, hem_y - 0.03),
            ],
            fill=fold,
            width=max(1, round(0.012 * big)),
        )
    return img.resize((size, size), Image.Resampling.BOX)


def prompt_lines(size: int, steps: int = 10, cfg: float = 1.0) -> list[str]:
    """kohya sample-prompt lines for the demo (one per caption, seeds 1..4)."""
    negative = "blurry, lowres"
    return [
        f"{caption} --n {negative} --w {size} --h {size} --d {seed} --s {steps} --l {cfg:g}"
        for seed, caption in enumerate(CAPTIONS, start=1)
    ]


def draw_on_grid(pose: DressPose, size: int, block: int) -> Image.Image:
    """The dress drawn at size / block px, each pixel then repeated block × block times.

    The demo's VAE encodes 4 × 4 pixel blocks into one latent and decodes by repeating pixels, so the tiny
    model can only ever draw images made of such blocks; a dress drawn on that grid is one it can copy exactly.
    """
    return draw_dress(pose, size // block).resize((size, size), Image.Resampling.NEAREST)


def build_dataset(dir: Path, n: int = 8, size: int = 64, seed: int = 0, repeats: int = 10, block: int = 1) -> Path:
    """Write `n` images of `size` px and captions under `dir/<repeats>_dress/`, plus `dir/prompts.txt`.

    Returns `dir`, kohya's `--train_data_dir` (kohya reads only its sub-folders, so the prompt file
    beside them is ignored by training). Deterministic for a given `seed`. `block` > 1: each image is drawn
    on a grid of block × block pixel squares (`draw_on_grid`).
    """
    if n < 1 or size < 16:
        raise ValueError(f"need n >= 1 and size >= 16 px, got n={n}, size={size}")
    if block < 1 or size % block or size // block < 8:
        raise ValueError(f"block = {block} must divide size = {size} into at least 8 squares a side")
    dir = Path(dir)
    sub = dir / f"{repeats}_{CLASS_TOKEN}"
    sub.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n):
        pose = random_pose(rng)
        image = draw_dress(pose, size) if block == 1 else draw_on_grid(pose, size, block)
        image.save(sub / f"img_{i:03d}.png", optimize=False)
        (sub / f"img_{i:03d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n", encoding="utf-8")
    header = [
        "# lora-monitor demo sample prompts (kohya format):",
        "# --n negative prompt, --w/--h size in px, --d seed, --s steps, --l CFG scale",
    ]
    prompts_path(dir).write_text("\n".join(header + prompt_lines(size)) + "\n", encoding="utf-8")
    return dir


def prompts_path(dataset_dir: Path) -> Path:
    """Where `build_dataset(dataset_dir, ...)` writes the sample-prompt file."""
    return Path(dataset_dir) / "prompts.txt"
