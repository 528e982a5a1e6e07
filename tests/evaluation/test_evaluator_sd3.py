"""SD3's CFG default per variant, told apart by the transformer's config (the common part, loading, defaults and
kohya's file applied, is in test_evaluator_families.py)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from lora_monitor.evaluation.pipelines import SD3Adapter
from lora_monitor.evaluation.prompts import Prompt
from tests.sd3_model import FIXTURE

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LORA = FIXTURE / "tiny-step00000004.safetensors"
PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11)]
CPU = torch.device("cpu")


@pytest.mark.parametrize(("qk_norm", "dual", "variant", "guidance"), [
    (None, [], "sd3-medium", 7.0), ("rms_norm", [], "sd3.5-large", 3.5), ("rms_norm", [0], "sd3.5-medium", 4.5),
])
def test_sd3_variant_sets_the_guidance(qk_norm: str | None, dual: list, variant: str, guidance: float) -> None:
    config = SimpleNamespace(qk_norm=qk_norm, dual_attention_layers=dual)  # SD3Transformer2DModel.config's keys
    adapter = SD3Adapter(SimpleNamespace(transformer=SimpleNamespace(config=config)))
    assert (adapter.variant(), adapter.default_guidance(), adapter.default_steps()) == (variant, guidance, 28)
