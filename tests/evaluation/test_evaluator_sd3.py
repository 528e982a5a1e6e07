"""SD3 evaluation on a tiny StableDiffusion3Pipeline built from configs (tests/sd3_model.py): loading from a diffusers
folder, SD3's defaults, kohya's own SD3 LoRA file changing the images and the base restored bit for bit."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lora_monitor.config import EvalConfig
from lora_monitor.errors import UserError
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.pipelines import SD3Adapter
from lora_monitor.evaluation.prompts import Prompt
from tests.sd3_model import FIXTURE, build_tiny_sd3

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LORA = FIXTURE / "tiny-step00000004.safetensors"
PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11)]
CPU = torch.device("cpu")


def _pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.float64) for im in images]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "model")


def test_sd3_defaults_cfg_with_negative_prompt(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="sd3")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    evaluator = ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", negative_prompt="blurry"), tmp_path)
    # 32 latent px x the tiny VAE's scale 2 (SD3: 128 x 8 = 1024); 28 steps; SD3.5-large's CFG (q/k norm, no
    # dual attention); the negative prompt kept: SD3 uses classifier-free guidance
    assert evaluator._groups() == {(64, 64, 28, 3.5, "blurry"): [0, 1]}
    with pytest.raises(UserError, match="SD3 samples with its own flow-matching scheduler"):
        ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", scheduler="ddim"), tmp_path)


@pytest.mark.parametrize(("qk_norm", "dual", "variant", "guidance"), [
    (None, [], "sd3-medium", 7.0), ("rms_norm", [], "sd3.5-large", 3.5), ("rms_norm", [0], "sd3.5-medium", 4.5),
])
def test_sd3_variant_sets_the_guidance(qk_norm: str | None, dual: list, variant: str, guidance: float) -> None:
    config = SimpleNamespace(qk_norm=qk_norm, dual_attention_layers=dual)  # SD3Transformer2DModel.config's keys
    adapter = SD3Adapter(SimpleNamespace(transformer=SimpleNamespace(config=config)))
    assert (adapter.variant(), adapter.default_guidance(), adapter.default_steps()) == (variant, guidance, 28)


def test_kohya_sd3_lora_changes_images_and_the_base_comes_back_bit_for_bit(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="sd3")
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2)
    evaluator = ev.Evaluator(pipe, PROMPTS, cfg, tmp_path)
    base = evaluator.generate_base()
    assert [im.size for im in base.images] == [(64, 64)] * 2
    with_lora = evaluator.generate(LORA)  # kohya's own SD3 file: 17 MMDiT + 12 CLIP-L + 12 CLIP-G modules
    pairs = zip(_pixels(base.images), _pixels(with_lora.images), strict=True)
    assert all(np.abs(a - b).mean() > 0.01 for a, b in pairs)
    again = evaluator.generate_base()
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(base.images), _pixels(again.images), strict=True))
