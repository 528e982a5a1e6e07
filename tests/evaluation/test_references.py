"""Reference images: discovery, kohya captions, safe decoding, and the per-image feature cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_monitor.errors import UserError
from lora_monitor.evaluation.references import (
    ReferenceFeatureCache,
    UnreadableImageError,
    file_digest,
    find_reference_images,
    load_image,
    read_caption,
    read_captions,
)


def _png(path: Path, color: tuple[int, int, int] = (200, 30, 40), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).convert(mode).save(path)
    return path


def test_find_reference_images_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    wanted = [
        _png(tmp_path / "10_sks dress" / "b.png"),
        _png(tmp_path / "10_sks dress" / "a.JPG"),
        _png(tmp_path / "c.webp"),
        _png(tmp_path / "d.bmp"),
        _png(tmp_path / "nested" / "deeper" / "e.jpeg"),
    ]
    (tmp_path / "10_sks dress" / "b.txt").write_text("a photo of sks dress")
    (tmp_path / "notes.gif").write_bytes(b"GIF89a")
    _png(tmp_path / ".cache" / "hidden.png")
    _png(tmp_path / ".hidden.png")
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is not an image
    assert find_reference_images(tmp_path) == sorted(wanted)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "reference folder not found"),
        ("file", "not a folder"),
        ("empty", "no reference images"),
        ("only_text", "no reference images"),
    ],
)
def test_find_reference_images_user_errors(tmp_path: Path, setup: str, message: str) -> None:
    target = tmp_path / "refs"
    if setup == "file":
        target.write_text("x")
    elif setup in ("empty", "only_text"):
        target.mkdir()
        if setup == "only_text":
            (target / "caption.txt").write_text("a dress")
    with pytest.raises(UserError, match=message) as info:
        find_reference_images(target)
    assert str(target) in str(info.value)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({".txt": "a photo of sks dress, red"}, "a photo of sks dress, red"),
        ({".caption": "sks dress"}, "sks dress"),
        ({".txt": "from txt", ".caption": "from caption"}, "from txt"),
        ({}, ""),
        ({".txt": "\n\n  first line  \nsecond line\n"}, "first line"),
        ({".txt": "\ufeffwith bom"}, "with bom"),
        ({".txt": ""}, ""),
    ],
)
def test_read_caption(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    image = _png(tmp_path / "img.png")
    for suffix, text in files.items():
        image.with_suffix(suffix).write_text(text, encoding="utf-8")
    assert read_caption(image) == expected


def test_read_captions_keeps_order_and_rejects_non_utf8(tmp_path: Path) -> None:
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    b.with_suffix(".txt").write_text("caption b")
    assert read_captions([b, a]) == ["caption b", ""]
    a.with_suffix(".txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    with pytest.raises(UserError, match="not UTF-8"):
        read_captions([a])


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "I;16"])
def test_load_image_returns_rgb(tmp_path: Path, mode: str) -> None:
    suffix = ".jpg" if mode == "CMYK" else ".png"
    img = load_image(_png(tmp_path / f"x{suffix}", mode=mode))
    assert img.mode == "RGB" and img.size == (8, 8)


def test_load_image_puts_transparency_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (200, 30, 40, 255))
    rgba.save(tmp_path / "t.png")
    img = load_image(tmp_path / "t.png")
    assert img.getpixel((3, 3)) == (255, 255, 255)
    assert img.getpixel((0, 0)) == (200, 30, 40)


@pytest.mark.parametrize(
    "content",
    [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "truncated"],
)
def test_load_image_corrupt_files_raise_a_clear_user_error(tmp_path: Path, content: bytes | str) -> None:
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.new("RGB", (64, 64), (10, 200, 30)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    else:
        path.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(UnreadableImageError, match="cannot read image") as info:
        load_image(path)
    assert isinstance(info.value, UserError)
    assert str(path) in str(info.value)


def test_load_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UnreadableImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_file_digest_is_sha256_of_content(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc" * 1000)
    assert file_digest(path) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_feature_cache_round_trip_miss_and_corrupt_entry(tmp_path: Path) -> None:
    cache = ReferenceFeatureCache(tmp_path)
    keys = {"emb": "model-a|v1", "color": "color|v1"}
    feats = {"emb": np.arange(4, dtype=np.float32), "color": np.ones((2, 3), dtype=np.float32)}
    assert cache.get_all(keys, "d1") is None
    cache.put_all(keys, "d1", feats)
    got = cache.get_all(keys, "d1")
    assert got is not None
    for name in feats:
        np.testing.assert_array_equal(got[name], feats[name])
    assert cache.get_all({"emb": "model-b|v1"}, "d1") is None  # another model never reads these
    assert cache.get_all(keys, "d2") is None
    next((tmp_path / "reference-features").rglob("d1.npy")).write_bytes(b"garbage")
    assert cache.get_all(keys, "d1") is None
