"""`lora-monitor score` and `lora-monitor report` through the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from lora_monitor.cli import main
from tests.conftest import write_config


def _images(demo_assets) -> list[Path]:
    return sorted(Path(demo_assets.train_data_dir).rglob("*.png"))


def test_score_json_same_images_score_zero(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets)
    folder = tmp_path / "copies"
    folder.mkdir()
    refs = tmp_path / "refs"
    refs.mkdir()
    first = _images(demo_assets)[0]
    for i in range(3):  # copies of one image against that image: every loss is 0
        shutil.copy(first, folder / f"{i}.png")
    shutil.copy(first, refs / "ref.png")
    result = CliRunner().invoke(main, ["score", str(folder), "--references", str(refs), "--config", str(config),
                                       "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["n_images"] == 3 and data["n_references"] == 1
    for key in ("visual_loss", "fashion_clip_loss", "color_loss"):
        assert abs(data[key]) < 1e-5, key


def test_score_moves_with_colour_and_clip_t_with_prompts(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets)
    blue = tmp_path / "blue"
    blue.mkdir()
    for i, path in enumerate(_images(demo_assets)[:2]):
        image = Image.open(path).convert("RGB")
        r, g, b = image.split()
        Image.merge("RGB", (b, g, r)).save(blue / f"{i}.png")  # the red dress turned blue
    prompts = tmp_path / "p.txt"
    prompts.write_text("a blue dress\na blue dress\n")
    result = CliRunner().invoke(main, ["score", str(blue), "--references", str(demo_assets.train_data_dir),
                                       "--config", str(config), "--prompts", str(prompts), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["color_loss"] > 20
    assert -1.0 <= data["clip_t"] <= 1.0
    assert data["n_references"] == len(_images(demo_assets))


def test_report_command_needs_a_csv(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no CSV to report on" in result.stderr


def test_rgba_in_memory_is_composited_on_white_like_a_file() -> None:
    """An in-memory RGBA image scores as its file would: transparent pixels are white, not black."""
    from PIL import Image

    from lora_monitor.evaluation.color import color_distance
    from lora_monitor.evaluation.metrics import pad_to_square

    clear = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    clear.paste((0, 0, 200, 255), (4, 4, 12, 12))  # a blue square on a transparent background
    on_white = Image.new("RGB", (16, 16), (255, 255, 255))
    on_white.paste((0, 0, 200), (4, 4, 12, 12))
    assert pad_to_square(clear).getpixel((0, 0)) == (255, 255, 255)
    red = Image.new("RGB", (16, 16), (200, 0, 0))
    assert color_distance([clear], [red]) == color_distance([on_white], [red])


def test_score_skips_an_unreadable_image_and_scores_the_rest(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_images(demo_assets)[:2]):
        shutil.copy(image, folder / f"{i}.png")
    (folder / "2.png").write_bytes(b"not a png")
    result = CliRunner().invoke(main, ["score", str(folder), "--references", str(demo_assets.train_data_dir),
                                       "--config", str(config), "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["n_images"] == 2
    assert any("2.png" in s and "cannot read image" in s for s in data["skipped"])


# -- over-training signals: diversity (grouped by prompt) and copy_distance / copies --------------------------


def _score(folder: Path, refs: Path, config: Path, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["score", str(folder), "--references", str(refs), "--config", str(config),
                                       "--json", *extra])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def _blue(path: Path) -> Image.Image:
    r, g, b = Image.open(path).convert("RGB").split()
    return Image.merge("RGB", (b, g, r))  # the red dress turned blue: the same cut, far in pixels


def test_score_copies_of_a_reference_are_copies_with_no_diversity(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets)
    folder = tmp_path / "copies"
    folder.mkdir()
    first = _images(demo_assets)[0]
    for i in range(3):
        shutil.copy(first, folder / f"{i}.png")
    data = _score(folder, Path(demo_assets.train_data_dir), config)
    assert data["diversity"] is not None and abs(data["diversity"]) < 1e-5  # one group, identical images
    assert data["copy_distance"] < 1e-6
    assert data["copies"] == 3 and data["copy_threshold"] == 0.15


def test_score_other_garments_are_not_copies_and_vary(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets)
    folder = tmp_path / "blue"
    folder.mkdir()
    for i, path in enumerate(_images(demo_assets)[:4]):
        _blue(path).save(folder / f"{i}.png")
    data = _score(folder, Path(demo_assets.train_data_dir), config)
    assert data["copies"] == 0
    assert data["copy_distance"] > 0.15
    assert data["diversity"] > 0


def test_score_diversity_groups_images_by_prompt_line(tmp_path: Path, demo_assets) -> None:
    """Images 0, 1 are one drawing and 2, 3 another: within each prompt nothing varies, across them it does."""
    config = write_config(tmp_path, demo_assets)
    folder = tmp_path / "pairs"
    folder.mkdir()
    images = _images(demo_assets)
    for i, source in enumerate([images[0], images[0], images[1], images[1]]):
        _blue(source).save(folder / f"{i}.png")
    grouped = tmp_path / "grouped.txt"
    grouped.write_text("a blue dress --d 1\na blue dress --d 2\nanother blue dress --d 1\nanother blue dress --d 2\n")
    crossed = tmp_path / "crossed.txt"  # each prompt gets one image of each drawing
    crossed.write_text("a blue dress\nanother blue dress\na blue dress\nanother blue dress\n")
    assert abs(_score(folder, Path(demo_assets.train_data_dir), config, "--prompts", str(grouped))["diversity"]) < 1e-5
    assert _score(folder, Path(demo_assets.train_data_dir), config, "--prompts", str(crossed))["diversity"] > 1e-3
    assert _score(folder, Path(demo_assets.train_data_dir), config)["diversity"] > 1e-3  # no prompts: one group


def test_score_diversity_is_empty_when_no_prompt_has_two_images(tmp_path: Path, demo_assets) -> None:
    config = write_config(tmp_path, demo_assets)
    folder = tmp_path / "two"
    folder.mkdir()
    for i, path in enumerate(_images(demo_assets)[:2]):
        shutil.copy(path, folder / f"{i}.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red dress\na red dress, sks style\n")
    assert _score(folder, Path(demo_assets.train_data_dir), config, "--prompts", str(prompts))["diversity"] is None
    result = CliRunner().invoke(main, ["score", str(folder), "--references", str(demo_assets.train_data_dir),
                                       "--config", str(config), "--prompts", str(prompts)])
    assert result.exit_code == 0, result.stderr
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in result.stdout.splitlines()}
    assert lines["diversity"].startswith("n/a")
    assert lines["copies"] == "2" and float(lines["copy_distance"]) < 1e-6


def test_score_copies_follow_the_configured_threshold(tmp_path: Path, demo_assets) -> None:
    """A JPEG re-encode of a reference is a copy at the default threshold, not at a far stricter one."""
    config = write_config(tmp_path, demo_assets)
    folder = tmp_path / "jpeg"
    folder.mkdir()
    Image.open(_images(demo_assets)[0]).convert("RGB").save(folder / "0.jpg", quality=75)
    data = _score(folder, Path(demo_assets.train_data_dir), config)
    assert data["copies"] == 1 and 0 < data["copy_distance"] < 0.15
    strict = tmp_path / "strict.toml"
    text = config.read_text()
    assert "[metrics]\n" in text
    strict.write_text(text.replace("[metrics]\n", f"[metrics]\ncopy_threshold = {data['copy_distance'] / 2}\n"))
    again = _score(folder, Path(demo_assets.train_data_dir), strict)
    assert again["copies"] == 0 and again["copy_distance"] == data["copy_distance"]
