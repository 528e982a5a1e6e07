"""The demo's scenarios: the default demo's config is unchanged; the over-training scenario's data and settings."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from lora_monitor.cli import main
from lora_monitor.demo.build import SCENARIOS, build_demo
from lora_monitor.demo.dataset import DressPose, draw_on_grid
from lora_monitor.demo.run import demo_config_text


def _workdir(demo_assets) -> Path:
    return Path(demo_assets.base_model).parent.parent  # models/tiny-sd inside the work folder


def test_default_config_keeps_its_settings(tmp_path: Path, demo_assets) -> None:
    text = demo_config_text(demo_assets, tmp_path)
    assert text.startswith("# lora-monitor demo: a tiny model learns a red dress; every checkpoint is scored live.\n")
    assert '[early_stopping]\nenabled = false\nmonitor = "eval_score"\npatience = 3\n\n' in text
    assert 'output_name = "demo_dress"' in text and "max_train_steps = 160" in text
    assert Path(demo_assets.train_data_dir).name == "data"
    assert len(list(Path(demo_assets.train_data_dir).glob("10_dress/*.png"))) == 8


def test_overtrain_scenario_has_one_image_and_stops_on_overtraining(tmp_path: Path, demo_assets) -> None:
    paths = build_demo(_workdir(demo_assets), "overtrain")  # reuses the models, adds its own data folder
    assert paths.base_model == demo_assets.base_model
    images = sorted(Path(paths.train_data_dir).rglob("*.png"))
    assert Path(paths.train_data_dir).name == "data-overtrain" and len(images) == 1
    text = demo_config_text(paths, tmp_path)
    assert "overtraining = true" in text and 'output_name = "demo_overtrain"' in text
    assert SCENARIOS["overtrain"].description in text.splitlines()[0]
    assert build_demo(_workdir(demo_assets)).train_data_dir == demo_assets.train_data_dir  # default untouched


def test_grid_drawing_is_made_of_whole_vae_blocks() -> None:
    """The tiny VAE encodes 4 × 4 pixel blocks, so a copy of a grid drawing is something it can draw."""
    pose = DressPose(cx=0.5, top=0.1, height=0.8, shoulder=0.3, waist=0.2, hem=0.6, tilt=0.0, rgb=(200, 24, 36))
    a = np.asarray(draw_on_grid(pose, 64, 4), dtype=np.int16)
    blocks = a.reshape(16, 4, 16, 4, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 2  # a dress, not a blank page


def test_grid_image_survives_the_demo_vae(demo_assets) -> None:
    import torch
    from diffusers import AutoencoderKL

    paths = build_demo(_workdir(demo_assets), "overtrain")
    image = Image.open(next(Path(paths.train_data_dir).rglob("*.png"))).convert("RGB")
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    vae = AutoencoderKL.from_pretrained(paths.base_model, subfolder="vae")
    with torch.no_grad():
        back = vae.decode(vae.encode(x).latent_dist.mean).sample
    assert float((back - x).abs().max()) < 0.01


def test_unknown_scenario_is_refused(tmp_path: Path, demo_assets) -> None:
    with pytest.raises(ValueError, match="unknown demo scenario"):
        build_demo(_workdir(demo_assets), "nope")
    result = CliRunner().invoke(main, ["demo", "--scenario", "nope", "--workdir", str(tmp_path)])
    assert result.exit_code == 2 and "overtrain" in result.output


def test_scenario_changes_only_what_it_names(demo_assets) -> None:
    paths = build_demo(_workdir(demo_assets), "overtrain")
    plan = SCENARIOS["overtrain"]
    changed = {k for k in paths.kohya_args if paths.kohya_args[k] != demo_assets.kohya_args.get(k)}
    assert changed == set(plan.kohya_args)
    assert dataclasses.replace(paths, kohya_args={}, early_stopping={}, train_data_dir=Path(), prompts=Path(),
                               scenario="") == dataclasses.replace(demo_assets, kohya_args={}, early_stopping={},
                                                                   train_data_dir=Path(), prompts=Path(), scenario="")


def test_cli_offers_every_scenario() -> None:
    """The CLI lists the scenarios itself (importing the demo's builder would load torch for every command)."""
    option = next(p for p in main.commands["demo"].params if p.name == "scenario")
    assert list(option.type.choices) == list(SCENARIOS)
