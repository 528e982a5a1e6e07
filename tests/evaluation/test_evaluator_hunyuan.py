"""HunyuanImage 2.1 on the tiny HunyuanImagePipeline of tests/hunyuan_model.py: guidance is set on the pipeline's
guiders (it takes no guidance_scale argument), quoted text reaches ByT5, and the distilled model takes
distilled_guidance_scale (the common part, defaults and kohya's file applied, is in test_evaluator_families.py)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_monitor.config import EvalConfig
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.pipelines import HunyuanImageAdapter
from lora_monitor.evaluation.prompts import Prompt
from tests.hunyuan_model import FIXTURE, build_tiny_hunyuan

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LORA = FIXTURE / "tiny-step00000004.safetensors"
PROMPTS = [Prompt("a photo of a red dress"), Prompt('a shirt that says "hello"', seed=11)]  # 2nd: quoted text
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hunyuan(tmp_path_factory.mktemp("hunyuan") / "model")


def test_guidance_is_set_on_the_guiders(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="hunyuan_image")
    evaluator = ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu"), tmp_path)
    assert evaluator.adapter.default_guidance() == pipe.guider.guidance_scale == 3.5  # the model's own guider's
    assert evaluator.adapter.guidance_kwargs(5.0) == {}  # no such call argument: the guiders carry it
    assert pipe.guider.guidance_scale == pipe.ocr_guider.guidance_scale == 5.0  # ocr: prompts with quoted text
    embeds = evaluator.adapter.encode([p.text for p in PROMPTS], CPU, 5.0, "blurry")
    assert {"prompt_embeds_2", "negative_prompt_embeds", "negative_prompt_embeds_mask_2"} <= set(embeds)
    assert embeds["prompt_embeds_2"][0].abs().sum() == 0 < embeds["prompt_embeds_2"][1].abs().sum()  # ByT5: quotes


def test_the_distilled_model_takes_distilled_guidance_scale() -> None:
    config = SimpleNamespace(guidance_embeds=True)
    adapter = HunyuanImageAdapter(SimpleNamespace(transformer=SimpleNamespace(config=config)))
    assert (adapter.default_steps(), adapter.default_guidance(), adapter.negative("blurry")) == (8, 3.25, "")
    assert adapter.guidance_kwargs(2.0) == {"distilled_guidance_scale": 2.0}
