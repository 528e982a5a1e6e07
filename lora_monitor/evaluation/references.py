"""Reference (training) images: finding them, reading kohya captions, decoding them, caching features."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lora_monitor.errors import UserError

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES: tuple[str, ...] = (".txt", ".caption")


class UnreadableImageError(UserError):
    """An image file that PIL cannot decode (corrupt, truncated, not an image)."""


def find_reference_images(directory: Path) -> list[Path]:
    """All images under `directory` (recursive; .png .jpg .jpeg .webp .bmp, any case), sorted by path.

    Files and folders whose name starts with a dot are skipped (caches, editor files). kohya's dataset
    layout (`10_sks dress/img.png`) is covered by the recursion.
    """
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"reference folder not found: {directory}; point the references setting at the "
                        "folder of training images")
    if not directory.is_dir():
        raise UserError(f"reference path is not a folder: {directory}; give the folder that holds the "
                        "training images")
    found = [
        p
        for p in directory.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    ]
    if not found:
        kinds = " ".join(IMAGE_SUFFIXES)
        raise UserError(f"no reference images ({kinds}) in {directory} or its subfolders; put the training "
                        "images there")
    return sorted(found)


def read_caption(image_path: Path, suffixes: tuple[str, ...] = CAPTION_SUFFIXES) -> str:
    """The kohya caption of one image: first non-empty line of `name.txt`, else `name.caption`, else "".

    kohya uses the first line of the caption file as the caption; leading blank lines are skipped here.
    """
    for suffix in suffixes:
        path = Path(image_path).with_suffix(suffix)
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UserError(
                f"caption file is not UTF-8 text: {path} ({exc.reason}); re-save it as UTF-8"
            ) from exc
        except OSError as exc:
            raise UserError(f"cannot read caption file {path} ({exc.strerror or exc}); check its "
                            "permissions") from exc
        for line in text.splitlines():
            if line.strip():
                return line.strip()
        return ""
    return ""


def read_captions(paths: list[Path], suffixes: tuple[str, ...] = CAPTION_SUFFIXES) -> list[str]:
    """Captions of `paths` in order (see `read_caption`); "" for an image without a caption file."""
    return [read_caption(p, suffixes) for p in paths]


def load_image(path: Path) -> Image.Image:
    """Decode an image file fully into an RGB PIL image.

    EXIF rotation is applied (the image as a viewer shows it) and transparency is composited onto white,
    the background the metrics treat as empty. Raises UnreadableImageError (a UserError) for a file that
    is missing, unreadable, truncated or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb_on_white(img)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise UnreadableImageError(
            f"cannot read image {path} ({reason}); replace or remove the file"
        ) from exc


def to_rgb_on_white(img: Image.Image) -> Image.Image:
    """RGB copy of `img`; transparent pixels become white rather than black."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def file_digest(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes: the cache key of a reference image (renames keep it)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ReferenceFeatureCache:
    """Per-image reference features on disk: ROOT/reference-features/<key hash>/<file sha256>.npy.

    A feature key names what produced the array (model fingerprint, preprocessing version), so a changed
    model never reads stale embeddings. Files are written atomically and read with allow_pickle=False; an
    unreadable entry counts as a miss. Writing is best effort: the cache only saves time.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root) / "reference-features"

    def _path(self, key: str, digest: str) -> Path:
        return self.root / hashlib.sha256(key.encode("utf-8")).hexdigest()[:16] / f"{digest}.npy"

    def get_all(self, keys: Mapping[str, str], digest: str) -> dict[str, np.ndarray] | None:
        """The features named by `keys` (feature name -> key) for one image, or None if any is missing."""
        found: dict[str, np.ndarray] = {}
        for name, key in keys.items():
            path = self._path(key, digest)
            try:
                found[name] = np.load(path, allow_pickle=False)
            except (OSError, ValueError):
                return None
        return found

    def put_all(self, keys: Mapping[str, str], digest: str, features: Mapping[str, np.ndarray]) -> None:
        for name, key in keys.items():
            path = self._path(key, digest)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                label = path.parent / "key.txt"
                if not label.exists():
                    label.write_text(key + "\n", encoding="utf-8")
                fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            except OSError:
                continue
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, np.asarray(features[name]), allow_pickle=False)
                os.replace(tmp, path)
            except OSError:
                Path(tmp).unlink(missing_ok=True)
