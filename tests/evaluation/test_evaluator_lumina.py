"""Lumina 2 evaluation on a tiny Lumina2Pipeline built from configs (tests/lumina_model.py): loading from a diffusers
folder, Lumina's defaults, kohya's own Lumina file (NextDiT and Gemma2 modules) changing the images, and the base
restored bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_monitor.config import EvalConfig
from lora_monitor.errors import UserError
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.prompts import Prompt
from tests.lumina_model import FIXTURE, build_tiny_lumina

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LORA = FIXTURE / "tiny-step00000004.safetensors"
PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11)]
CPU = torch.device("cpu")


def _pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.float64) for im in images]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lumina(tmp_path_factory.mktemp("lumina") / "model")


def test_lumina_defaults_cfg_with_negative_prompt(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="lumina")
    assert type(pipe).__name__ == "Lumina2Pipeline"
    evaluator = ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", negative_prompt="blurry"), tmp_path)
    # 8 latent px x the pipeline's fixed scale 8 (Lumina-Image-2.0: 128 x 8 = 1024); 30 steps at CFG 4.0
    assert evaluator._groups() == {(64, 64, 30, 4.0, "blurry"): [0, 1]}
    with pytest.raises(UserError, match="Lumina 2 samples with its own flow-matching scheduler"):
        ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", scheduler="ddim"), tmp_path)


def test_kohya_lumina_lora_changes_images_and_the_base_comes_back_bit_for_bit(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="lumina")
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2, negative_prompt="blurry")
    evaluator = ev.Evaluator(pipe, PROMPTS, cfg, tmp_path)
    base = evaluator.generate_base()
    assert [im.size for im in base.images] == [(64, 64)] * 2
    with_lora = evaluator.generate(LORA)  # kohya's own file: 19 NextDiT + 14 Gemma2 modules
    pairs = zip(_pixels(base.images), _pixels(with_lora.images), strict=True)
    assert all(np.abs(a - b).mean() > 0.01 for a, b in pairs)
    again = evaluator.generate_base()
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(base.images), _pixels(again.images), strict=True))


@pytest.mark.parametrize(("system", "encoded"), [
    ("", "a photo of a red dress"),  # kohya's default --system_prompt: the bare caption, no marker
    ("You draw clothes.", "You draw clothes. <Prompt Start> a photo of a red dress"),
])
def test_prompts_are_encoded_as_kohya_trains_them(tiny: Path, tmp_path: Path, system: str, encoded: str) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="lumina")
    evaluator = ev.Evaluator(pipe, PROMPTS[:1], EvalConfig(device="cpu", system_prompt=system), tmp_path)
    got = evaluator.adapter.encode(["a photo of a red dress"], CPU, 4.0, "")
    want, mask = pipe._get_gemma_prompt_embeds(prompt=[encoded], device=CPU, max_sequence_length=256)
    torch.testing.assert_close(got["prompt_embeds"], want, atol=0, rtol=0)
    assert torch.equal(got["prompt_attention_mask"], mask) and "negative_prompt_embeds" in got
    other, _ = pipe._get_gemma_prompt_embeds(prompt=[f"x{encoded}"], device=CPU, max_sequence_length=256)
    assert not torch.equal(other, want)  # the text decides the embeddings: equality above means something
