"""Lumina 2's prompts encoded as kohya trains them, behind its system prompt or bare (the common part, loading,
defaults and kohya's file applied, is in test_evaluator_families.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lora_monitor.config import EvalConfig
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.prompts import Prompt
from tests.lumina_model import FIXTURE, build_tiny_lumina

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LORA = FIXTURE / "tiny-step00000004.safetensors"
PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11)]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lumina(tmp_path_factory.mktemp("lumina") / "model")


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
