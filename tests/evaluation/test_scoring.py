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
