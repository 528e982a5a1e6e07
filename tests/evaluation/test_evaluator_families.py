"""The transformer families kohya trains (SD3.x, Lumina 2, HunyuanImage 2.1, Anima) through the Evaluator, each on its
tiny pipeline (tests/<family>_model.py) and kohya's own LoRA file of that family: the family's pipeline class and
defaults, its own flow-matching scheduler kept, every module of the file applied (counted), the images changed,
and the base model's images back bit for bit once the LoRA is gone. What is particular to one family is tested
in its own file (test_evaluator_<family>.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
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
from tests import anima_model, hunyuan_model, lumina_model, sd3_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11)]
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Case:
    build: Callable[[Path], Path]
    fixture: Path
    pipeline: str  # the pipeline class the family loads as
    label: str  # in the scheduler message
    groups_key: tuple  # (width, height, steps, guidance, negative) with [eval] unset but negative_prompt = "blurry"
    layers: int  # diffusers layers kohya's fixture file reaches (fused layers split)


CASES = {
    # SD3: 32 latent px x the tiny VAE's 2 (SD3: 1024), 28 steps, SD3.5-large's CFG (q/k norm, no dual attention);
    # 17 MMDiT modules (4 fused qkv -> 25 layers) + 12 CLIP-L + 12 CLIP-G
    "sd3": Case(sd3_model.build_tiny_sd3, sd3_model.FIXTURE, "StableDiffusion3Pipeline", "SD3",
                (64, 64, 28, 3.5, "blurry"), 25 + 24),
    # Lumina: 8 latent px x the pipeline's fixed 8, its own 30 steps at CFG 4; 19 NextDiT modules (25 layers)
    # + 14 Gemma2
    "lumina": Case(lumina_model.build_tiny_lumina, lumina_model.FIXTURE, "Lumina2Pipeline", "Lumina 2",
                   (64, 64, 30, 4.0, "blurry"), 25 + 14),
    # HunyuanImage: 64 latent px x the tiny VAE's 8, the pipeline's 50 steps, its guider's 3.5; 13 modules, 20 layers
    "hunyuan_image": Case(hunyuan_model.build_tiny_hunyuan, hunyuan_model.FIXTURE, "HunyuanImagePipeline",
                          "HunyuanImage 2.1", (512, 512, 50, 3.5, "blurry"), 20),
    # Anima: 128 x 8 px, 50 steps, its guider's CFG 4; 10 DiT + 14 Qwen3 modules
    "anima": Case(anima_model.build_tiny_anima, anima_model.FIXTURE, "AnimaPipeline", "Anima",
                  (1024, 1024, 50, 4.0, "blurry"), 24),
}


def _pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.float64) for im in images]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's tiny pipeline folder, built the first time a test asks for it."""

    class Folders(dict):
        def __missing__(self, family: str) -> Path:
            self[family] = CASES[family].build(tmp_path_factory.mktemp(family) / "model")
            return self[family]

    return Folders()


@pytest.mark.parametrize("family", list(CASES))
def test_pipeline_class_defaults_and_own_scheduler(family: str, folders: dict, tmp_path: Path) -> None:
    case = CASES[family]
    pipe = pl.load_pipeline(str(folders[family]), False, CPU, family=family)
    assert type(pipe).__name__ == case.pipeline
    evaluator = ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", negative_prompt="blurry"), tmp_path)
    assert evaluator.family == family
    assert evaluator._groups() == {case.groups_key: [0, 1]}
    with pytest.raises(UserError, match=f"{case.label} samples with its own flow-matching scheduler"):
        ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", scheduler="ddim"), tmp_path)


@pytest.mark.parametrize("family", list(CASES))
def test_kohya_lora_applied_whole_changes_images_and_the_base_comes_back(family: str, folders: dict,
                                                                         tmp_path: Path) -> None:
    case = CASES[family]
    lora = case.fixture / "tiny-step00000004.safetensors"
    pipe = pl.load_pipeline(str(folders[family]), False, CPU, family=family)
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2, negative_prompt="blurry")
    evaluator = ev.Evaluator(pipe, PROMPTS, cfg, tmp_path)
    base = evaluator.generate_base()
    assert [im.size for im in base.images] == [(64, 64)] * 2
    evaluator.swap_in(ev.load_lora_state(lora, family))  # raises unless every module of the file was applied
    assert len(coverage.adapted_targets(evaluator._components(), evaluator._adapter)) == case.layers
    with_lora = evaluator.generate(lora)
    # HunyuanImage's tiny file moves the weights by about 1%: a small change in 8-bit pixels, but a change
    assert all(not np.array_equal(a, b) for a, b in zip(_pixels(base.images), _pixels(with_lora.images),
                                                          strict=True))
    again = evaluator.generate_base()
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(base.images), _pixels(again.images), strict=True))
