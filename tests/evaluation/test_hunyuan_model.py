"""The tiny HunyuanImage 2.1 pipeline of tests/hunyuan_model.py: HunyuanImagePipeline loads it from its folder and
generates on CPU; its prompt encoding has the real pipeline's shapes (the system prompt cut at 34 tokens, ByT5
glyph embeddings only for quoted text); kohya's own HunyuanImage LoRA file, mapped by hunyuan_keys, changes the
images through the transformer's peft loader, and deleting the adapter gives the base images back bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_monitor.checkpoints import hunyuan_keys
from tests.hunyuan_model import BYT5_WIDTH, FIXTURE, TEXT_WIDTH, VAE_SCALE, build_tiny_hunyuan

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

LORA = FIXTURE / "tiny-step00000004.safetensors"
PROMPT = "a photo of a woman wearing a red dress"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory):
    from diffusers import HunyuanImagePipeline

    pipe = HunyuanImagePipeline.from_pretrained(str(build_tiny_hunyuan(tmp_path_factory.mktemp("hunyuan") / "model")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt: str = PROMPT) -> np.ndarray:
    out = pipe(prompt, negative_prompt="blurry", height=64, width=64, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images


def test_the_folder_loads_with_the_real_pipeline_s_components(pipe) -> None:
    names = {k: type(v).__name__ for k, v in pipe.components.items()}
    assert names == {"scheduler": "FlowMatchEulerDiscreteScheduler", "vae": "AutoencoderKLHunyuanImage",
                     "text_encoder": "Qwen2_5_VLForConditionalGeneration", "tokenizer": "Qwen2Tokenizer",
                     "text_encoder_2": "T5EncoderModel", "tokenizer_2": "ByT5Tokenizer",
                     "transformer": "HunyuanImageTransformer2DModel", "guider": "AdaptiveProjectedMixGuidance",
                     "ocr_guider": "AdaptiveProjectedMixGuidance"}
    assert pipe.vae_scale_factor == VAE_SCALE
    config = pipe.transformer.config
    assert (config.text_embed_dim, config.text_embed_2_dim) == (TEXT_WIDTH, BYT5_WIDTH)
    assert config.in_channels == pipe.vae.config.latent_channels == 64
    assert pipe.text_encoder.config.text_config.hidden_size == TEXT_WIDTH
    assert pipe.text_encoder_2.config.d_model == BYT5_WIDTH


def test_the_system_prompt_is_cut_where_the_pipeline_expects(pipe) -> None:
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(PROMPT, device=torch.device("cpu"))
    assert embeds.shape == (1, pipe.tokenizer_max_length, TEXT_WIDTH)
    # what is left: the prompt's own tokens and the closing <|im_end|>, then padding
    assert int(mask.sum()) == len(pipe.tokenizer(PROMPT).input_ids) + 1
    # no quoted text: zero glyph embeddings and mask
    assert embeds_2.shape == (1, pipe.tokenizer_2_max_length, BYT5_WIDTH)
    assert not embeds_2.any() and not mask_2.any()
    _, _, quoted, quoted_mask = pipe.encode_prompt('a sign that says "hello"', device=torch.device("cpu"))
    assert quoted.abs().sum() > 0
    assert int(quoted_mask.sum()) == len('Text "hello". ') + 1  # ByT5: one id per byte, then </s>


def test_generates_64px_images_reproducibly(pipe) -> None:
    image = _generate(pipe)
    assert image.shape == (1, 64, 64, 3)
    assert image.std() > 0.01
    assert np.array_equal(image, _generate(pipe))
    assert not np.array_equal(image, _generate(pipe, 'a sign that says "hello"'))  # through ByT5 and the ocr guider


def test_kohya_lora_changes_the_image_and_deleting_it_restores_the_base(pipe) -> None:
    base = _generate(pipe)
    peft = hunyuan_keys.to_diffusers(load_file(str(LORA)))
    pipe.transformer.load_lora_adapter(peft, prefix="transformer", adapter_name="a")
    try:
        adapted = {n for n, m in pipe.transformer.named_modules() if hasattr(m, "lora_A") and "a" in m.lora_A}
        assert {f"{k.removeprefix('transformer.').rsplit('.lora_', 1)[0]}" for k in peft} == adapted
        with_lora = _generate(pipe)
    finally:
        pipe.transformer.delete_adapters("a")
    # kohya's fixture is rank 4, alpha 1, up N(0, 0.02^2): it moves the weights by ~1% and the pixels by ~5e-5
    # (about 1% of 8-bit pixel values by one level); the base is reproduced bit for bit, so this is the LoRA's
    assert np.abs(with_lora - base).mean() > 1e-5
    assert np.array_equal(_generate(pipe), base)
