"""HunyuanImage 2.1 evaluation on the tiny HunyuanImagePipeline of tests/hunyuan_model.py: loading from a folder, the
family's defaults, guidance set on the pipeline's guiders (it has no guidance_scale argument), kohya's own file
applied through peft (the pipeline has no LoRA loader) with every module counted, and the base restored bit for bit."""

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
from tests.hunyuan_model import FIXTURE, build_tiny_hunyuan

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LORA = FIXTURE / "tiny-step00000004.safetensors"
PROMPTS = [Prompt("a photo of a red dress"), Prompt('a shirt that says "hello"', seed=11)]
CPU = torch.device("cpu")


def _pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.float64) for im in images]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hunyuan(tmp_path_factory.mktemp("hunyuan") / "model")


def test_hunyuan_defaults_and_guidance_on_the_guiders(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="hunyuan_image")
    assert type(pipe).__name__ == "HunyuanImagePipeline"
    evaluator = ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", negative_prompt="blurry"), tmp_path)
    # 64 latent px x the tiny VAE's scale 8 (2.1: x 32 = 2048); the pipeline's 50 steps; the guider's own scale
    assert evaluator._groups() == {(512, 512, 50, 3.5, "blurry"): [0, 1]}
    assert evaluator.adapter.guidance_kwargs(5.0) == {}  # no such argument: the guiders carry it
    assert pipe.guider.guidance_scale == pipe.ocr_guider.guidance_scale == 5.0
    with pytest.raises(UserError, match="HunyuanImage 2.1 samples with its own flow-matching scheduler"):
        ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", scheduler="ddim"), tmp_path)


def test_kohya_lora_applied_through_peft_and_the_base_comes_back_bit_for_bit(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="hunyuan_image")
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2, negative_prompt="blurry")
    evaluator = ev.Evaluator(pipe, PROMPTS, cfg, tmp_path)
    base = evaluator.generate_base()
    assert [im.size for im in base.images] == [(64, 64)] * 2
    evaluator.swap_in(ev.load_lora_state(LORA, "hunyuan_image"))  # raises unless all 13 modules were applied
    assert len(coverage.adapted_targets(evaluator._components(), evaluator._adapter)) == 20
    with_lora = evaluator.generate(LORA)
    # kohya's tiny file moves the weights by about 1%: a small change in 8-bit pixels, but a change
    assert any(not np.array_equal(a, b) for a, b in zip(_pixels(base.images), _pixels(with_lora.images),
                                                          strict=True))
    again = evaluator.generate_base()
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(base.images), _pixels(again.images), strict=True))
