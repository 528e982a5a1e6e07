"""The newer families end to end through the CLI: `eval-dir` on a folder of kohya LoRA files of SD3 or Lumina 2
(kohya's own fixture file and a stronger copy), no [kohya] section, the family's tiny diffusers folder as base
model; the family comes from the base model's model_index.json, each file gets a row of real metrics, and the
stronger LoRA scores differently."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests import lumina_model, sd3_model
from tests.conftest import cli

BUILDERS = {"sd3": sd3_model.build_tiny_sd3, "lumina": lumina_model.build_tiny_lumina}
FIXTURES = {"sd3": sd3_model.FIXTURE, "lumina": lumina_model.FIXTURE}

METRICS = ["visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score"]


def _copy(family: str, folder: Path, name: str, steps: int, up_factor: float) -> None:
    source = FIXTURES[family] / "tiny-step00000004.safetensors"
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata())
    state = {k: v * up_factor if ".lora_up." in k else v for k, v in load_file(str(source)).items()}
    save_file(state, str(folder / name), metadata={**metadata, "ss_steps": str(steps)})


@pytest.mark.parametrize("family", ["sd3", "lumina"])
def test_eval_dir_scores_kohya_files_of_the_family(family: str, demo_assets: Any, tmp_path: Path) -> None:
    base = BUILDERS[family](tmp_path / "model")
    folder = tmp_path / "run"
    folder.mkdir()
    _copy(family, folder, "tiny-step00000004.safetensors", 4, 1.0)
    _copy(family, folder, "tiny-step00000008.safetensors", 8, 4.0)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[eval]\nbase_model = "{base.as_posix()}"\nprompts = "{demo_assets.prompts.as_posix()}"\n'
        f'references = "{demo_assets.train_data_dir.as_posix()}"\nsteps = 2\nwidth = 64\nheight = 64\n'
        f'[metrics]\nfashion_clip_model = "{demo_assets.fashion_clip.as_posix()}"\n'
        f'visual_model = "{demo_assets.dino.as_posix()}"\n', encoding="utf-8")
    done = cli("eval-dir", str(folder), "--config", str(config), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = pd.read_csv(folder / "loss_tracker.csv")
    assert table["status"].iloc[0] == "baseline"  # the base model alone, scored the same way
    rows = table.iloc[1:].set_index("checkpoint")
    assert list(rows.index) == ["tiny-step00000004.safetensors", "tiny-step00000008.safetensors"]
    assert list(rows["status"]) == ["ok", "ok"], rows["note"].tolist()
    assert list(rows["step"]) == [4, 8]
    for metric in METRICS:
        assert all(math.isfinite(v) for v in rows[metric]), metric
    # the same prompts and seeds: a LoRA 4x as strong must change the images, so the scores differ
    assert rows.loc["tiny-step00000004.safetensors", "color_loss"] != rows.loc["tiny-step00000008.safetensors",
                                                                              "color_loss"]
