"""The tiny SDXL pipeline loads with the evaluator's loader; kohya SDXL LoRAs change its images."""

from __future__ import annotations

import os
import re
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_monitor.checkpoints.files import step_from_name
from lora_monitor.checkpoints.formats import (
    describe_lora,
    injected_modules,
    lora_modules,
    normalize_lora_state,
    verify_applied,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPT = "a photo of a red dress"


def _peft_state(model: torch.nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The state dict of a peft LoRA (rank 4) on a copy of `model`, with random non-zero weights."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    copy = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), deepcopy(model),
                                   adapter_name="make")
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.3
            for k, v in get_peft_model_state_dict(copy, adapter_name="make").items()}


_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
           "conv_shortcut": "skip_connection"}


def _sgm_unet_name(name: str) -> str:
    """kohya's SDXL (sgm) name of a tiny-SDXL UNet LoRA module (1 layer per block, attention in level 1)."""
    body = name.removeprefix("lora_unet_")
    rules = [  # (diffusers, sgm) for the tiny layout: input_blocks 1 | 2 (downsampler) | 3, output 0-3
        (r"down_blocks_0_resnets_0_(\w+)", lambda m: f"input_blocks_1_0_{_RESNET[m[1]]}"),
        (r"down_blocks_0_downsamplers_0_conv", lambda m: "input_blocks_2_0_op"),
        (r"down_blocks_1_resnets_0_(\w+)", lambda m: f"input_blocks_3_0_{_RESNET[m[1]]}"),
        (r"down_blocks_1_attentions_0_(\w+)", lambda m: f"input_blocks_3_1_{m[1]}"),
        (r"mid_block_resnets_(\d)_(\w+)", lambda m: f"middle_block_{2 * int(m[1])}_{_RESNET[m[2]]}"),
        (r"mid_block_attentions_0_(\w+)", lambda m: f"middle_block_1_{m[1]}"),
        (r"up_blocks_0_resnets_(\d)_(\w+)", lambda m: f"output_blocks_{m[1]}_0_{_RESNET[m[2]]}"),
        (r"up_blocks_0_attentions_(\d)_(\w+)", lambda m: f"output_blocks_{m[1]}_1_{m[2]}"),
        (r"up_blocks_0_upsamplers_0_conv", lambda m: "output_blocks_1_2_conv"),
        (r"up_blocks_1_resnets_(\d)_(\w+)", lambda m: f"output_blocks_{2 + int(m[1])}_0_{_RESNET[m[2]]}"),
    ]
    for pattern, sgm in rules:
        if m := re.fullmatch(pattern, body):
            return "lora_unet_" + sgm(m)
    raise AssertionError(f"no sgm name for {name}")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    from lora_monitor.evaluation.pipeline_loading import load_pipeline
    from tests.sdxl_model import build_tiny_sdxl

    folder = build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))
    pipe = load_pipeline(str(folder), sdxl=True, device=torch.device("cpu"))
    peft = {f"unet.{k}": v for k, v in _peft_state(pipe.unet, UNET_TARGETS, 1).items()}
    peft |= {f"text_encoder.{k}": v for k, v in _peft_state(pipe.text_encoder, TE_TARGETS, 2).items()}
    peft |= {f"text_encoder_2.{k}": v for k, v in _peft_state(pipe.text_encoder_2, TE_TARGETS, 3).items()}
    kohya = convert_state_dict_to_kohya(peft)
    return {"pipe": pipe, "kohya": kohya, "base": _generate(pipe)}


def _generate(pipe) -> np.ndarray:
    out = pipe(prompt=[PROMPT], width=32, height=32, num_inference_steps=2, guidance_scale=1.0,
               generator=[torch.Generator("cpu").manual_seed(0)], output_type="np")
    return out.images[0]


def test_pipeline_is_sdxl_shaped(sdxl: dict) -> None:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    pipe = sdxl["pipe"]
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.tokenizer_2(PROMPT).input_ids == [49406, 320, 1125, 539, 320, 736, 2595, 49407]
    assert sdxl["base"].shape == (32, 32, 3)


def test_kohya_keys_use_sdxl_prefixes(sdxl: dict) -> None:
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in sdxl["kohya"]}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert describe_lora(sdxl["kohya"]).startswith("kohya LoRA, rank 4")


def _kohya_state(sdxl: dict, unet_names: str) -> dict[str, torch.Tensor]:
    """"diffusers": ai-toolkit / OneTrainer LEGACY UNet names; "sgm": kohya sd-scripts / OneTrainer KOHYA."""
    state = dict(sdxl["kohya"])
    if unet_names == "sgm":
        state = {(_sgm_unet_name(k.split(".")[0]) + k[k.index("."):] if k.startswith("lora_unet_") else k): v
                 for k, v in state.items()}
        assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k") for k in state)
    return state


def _generate_with(sdxl: dict, state: dict[str, torch.Tensor], adapter: str) -> tuple[np.ndarray, dict]:
    """Image and injected-module counts with the LoRA loaded; the adapter is deleted again."""
    pipe = sdxl["pipe"]
    norm = normalize_lora_state(state)
    pipe.load_lora_weights(norm, adapter_name=adapter)
    try:
        verify_applied(pipe, adapter, norm)
        assert injected_modules(pipe, adapter) == lora_modules(norm)
        return _generate(pipe), injected_modules(pipe, adapter)
    finally:
        pipe.delete_adapters(adapter)


@pytest.mark.parametrize("unet_names", ["diffusers", "sgm"])
def test_kohya_sdxl_lora_changes_and_restores(sdxl: dict, unet_names: str) -> None:
    image, counts = _generate_with(sdxl, _kohya_state(sdxl, unet_names), f"sdxl_{unet_names}")
    assert set(counts) == {"unet", "text_encoder", "text_encoder_2"}
    assert counts["text_encoder"] == counts["text_encoder_2"] == 12  # 2 layers x q, k, v, out, fc1, fc2
    assert np.abs(image - sdxl["base"]).max() > 0.01  # the LoRA changes the image
    np.testing.assert_allclose(_generate(sdxl["pipe"]), sdxl["base"], atol=1e-6)  # deleting restores it


def test_both_unet_namings_give_the_same_image(sdxl: dict) -> None:
    first, _ = _generate_with(sdxl, _kohya_state(sdxl, "diffusers"), "same_a")
    second, _ = _generate_with(sdxl, _kohya_state(sdxl, "sgm"), "same_b")
    np.testing.assert_allclose(first, second, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [  # sdxl_train_network.py saves through train_network.py's NetworkTrainer: the same names as SD 1.x
        ("sdxl_dress-step00000050.safetensors", (50, None)),
        ("at-step00000100.safetensors", (100, None)),  # no --output_name: train_util's DEFAULT_STEP_NAME
        ("sdxl_dress-000003.safetensors", (None, 3)),
        ("epoch-000012.safetensors", (None, 12)),  # DEFAULT_EPOCH_NAME
        ("sdxl_dress.safetensors", (None, None)),  # final file
        ("last.safetensors", (None, None)),  # DEFAULT_LAST_OUTPUT_NAME
    ],
)
def test_step_from_kohya_sdxl_names(name: str, expected: tuple[int | None, int | None]) -> None:
    assert step_from_name(Path(name)) == expected
