"""Anima on the tiny modular pipeline of tests/anima_model.py, through AnimaPipeline: the folder names its family,
and prompts encoded once then the blocks after the text step give the modular pipeline's own images (the common
part, defaults and kohya's file applied, is in test_evaluator_families.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_monitor.config import EvalConfig
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.prompts import Prompt
from lora_monitor.families import family_of_model_folder
from tests.anima_model import FIXTURE, build_tiny_anima

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LORA = FIXTURE / "tiny-step00000004.safetensors"
PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11)]
CPU = torch.device("cpu")


def _pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.float64) for im in images]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_anima(tmp_path_factory.mktemp("anima") / "model")


def test_the_modular_folder_names_its_family(tiny: Path) -> None:
    assert family_of_model_folder(tiny) == "anima"  # from modular_model_index.json: eval-dir needs no [kohya]
    assert not (tiny / "model_index.json").exists()


def test_images_equal_the_modular_pipelines_own_call(tiny: Path, tmp_path: Path) -> None:
    """Prompts encoded once and the blocks after the text step: the images the pipeline itself gives."""
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="anima")
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2, guidance_scale=3.0)
    images = ev.Evaluator(pipe, PROMPTS, cfg, tmp_path).generate_base().images
    from diffusers.guiders import ClassifierFreeGuidance

    pipe.full.update_components(guider=ClassifierFreeGuidance(guidance_scale=3.0))
    own = pipe.full(prompt=[p.text for p in PROMPTS], negative_prompt=["", ""], height=64, width=64,
                    num_inference_steps=2, generator=[torch.Generator().manual_seed(s) for s in (42, 11)],
                    output="images")
    for a, b in zip(_pixels(images), _pixels(own), strict=True):
        assert np.abs(a - b).max() <= 1  # 8-bit rounding of the same latents
