"""Anima evaluation on the tiny modular Anima pipeline of tests/anima_model.py, through AnimaPipeline: loading from
its folder, Anima's defaults, prompts encoded once and the same images as the modular pipeline's own call, kohya's
own file (DiT and Qwen3 modules) applied with every module counted, and the base restored bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_monitor.checkpoints import coverage
from lora_monitor.config import EvalConfig
from lora_monitor.errors import UserError
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


def test_anima_folder_defaults_and_scheduler(tiny: Path, tmp_path: Path) -> None:
    assert family_of_model_folder(tiny) == "anima"  # from modular_model_index.json
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="anima")
    assert type(pipe).__name__ == "AnimaPipeline" and type(pipe.full).__name__ == "AnimaModularPipeline"
    evaluator = ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", negative_prompt="blurry"), tmp_path)
    assert evaluator._groups() == {(1024, 1024, 50, 4.0, "blurry"): [0, 1]}  # 128 x 8 px, 50 steps, CFG 4
    with pytest.raises(UserError, match="Anima samples with its own flow-matching scheduler"):
        ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", scheduler="ddim"), tmp_path)


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


def test_kohya_anima_lora_changes_images_and_the_base_comes_back_bit_for_bit(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="anima")
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2, negative_prompt="blurry")
    evaluator = ev.Evaluator(pipe, PROMPTS, cfg, tmp_path)
    base = evaluator.generate_base()
    evaluator.swap_in(ev.load_lora_state(LORA, "anima"))  # raises unless all 24 modules (10 DiT, 14 Qwen3) applied
    assert len(coverage.adapted_targets(evaluator._components(), evaluator._adapter)) == 24
    with_lora = evaluator.generate(LORA)
    pairs = zip(_pixels(base.images), _pixels(with_lora.images), strict=True)
    assert all(not np.array_equal(a, b) for a, b in pairs)
    again = evaluator.generate_base()
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(base.images), _pixels(again.images), strict=True))
