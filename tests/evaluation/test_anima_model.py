"""The tiny Anima folder (tests/anima_model.py) loads back as a user loads a real one, generates on CPU, and takes
kohya's own Anima LoRA file: through anima_keys its transformer modules go in with the pipeline's model loader and
its Qwen3 modules with peft, each changes the images, and removing them gives the base images back exactly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_monitor.checkpoints import anima_keys
from lora_monitor.evaluation import lora_attach
from tests.anima_model import FIXTURE, build_tiny_anima

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

PROMPTS = ["a red cat", "a woman wearing a blue dress"]
SEEDS = [11, 12]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_anima(tmp_path_factory.mktemp("anima") / "tiny-anima")


@pytest.fixture(scope="module")
def pipe(folder: Path):
    from diffusers import AnimaModularPipeline
    from diffusers.modular_pipelines import ModularPipeline

    pipe = ModularPipeline.from_pretrained(str(folder))
    assert isinstance(pipe, AnimaModularPipeline)  # picked from modular_model_index.json
    pipe.load_components()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **inputs) -> np.ndarray:
    """One 64 px image per prompt in 2 steps, each from its own seeded generator."""
    generators = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(height=64, width=64, num_inference_steps=2, generator=generators, output="images", output_type="np",
                **inputs)


def test_the_folder_loads_with_every_component_and_generates_repeatably(pipe) -> None:
    assert {"transformer", "text_encoder", "tokenizer", "t5_tokenizer", "text_conditioner", "vae", "scheduler",
            "guider"} <= set(pipe.components)
    assert type(pipe.text_encoder).__name__ == "Qwen3Model" and pipe.vae_scale_factor == 8
    images = generate(pipe, prompt=PROMPTS)
    assert images.shape == (2, 64, 64, 3)
    assert np.abs(images[0] - images[1]).max() > 1e-3  # prompts and seeds differ, so the images do
    np.testing.assert_array_equal(generate(pipe, prompt=PROMPTS), images)


def test_prompt_embeddings_computed_once_give_the_same_images(pipe) -> None:
    """The Qwen3 states and T5 ids can be encoded once and handed to the blocks after the text encoder."""
    from diffusers.modular_pipelines import AnimaAutoBlocks
    from diffusers.modular_pipelines.anima.encoders import AnimaTextEncoderStep

    encoded = AnimaTextEncoderStep.encode_prompt(pipe, prompt=PROMPTS, prepare_unconditional_embeds=True)
    blocks = AnimaAutoBlocks()
    blocks.sub_blocks.pop("text_encoder")
    rest = blocks.init_pipeline()
    rest.update_components(**{k: v for k, v in pipe.components.items() if k in rest._component_specs})
    rest.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(rest, **encoded), generate(pipe, prompt=PROMPTS))


def test_kohya_anima_lora_changes_the_images_and_comes_off_cleanly(pipe) -> None:
    state = load_file(str(FIXTURE / "tiny-step00000004.safetensors"))
    peft = anima_keys.to_diffusers(state)
    transformer = {k: v for k, v in peft.items() if k.startswith("transformer.")}
    text_encoder = {k.removeprefix("text_encoder."): v for k, v in peft.items() if k.startswith("text_encoder.")}
    assert len(transformer) == 2 * 10 and len(text_encoder) == 2 * 14 and len(peft) == len(transformer) + len(
        text_encoder)
    base = generate(pipe, prompt=PROMPTS)

    lora_attach.attach(pipe.text_encoder, text_encoder, "kohya")
    with_text_encoder = generate(pipe, prompt=PROMPTS)
    assert np.abs(with_text_encoder - base).max() > 1e-4
    pipe.transformer.load_lora_adapter(transformer, prefix="transformer", adapter_name="kohya")
    with_both = generate(pipe, prompt=PROMPTS)
    assert np.abs(with_both - with_text_encoder).max() > 1e-4

    pipe.transformer.delete_adapters("kohya")
    lora_attach.detach(pipe.text_encoder, "kohya")
    np.testing.assert_array_equal(generate(pipe, prompt=PROMPTS), base)


def test_the_pipeline_loader_takes_the_transformer_keys_and_peft_the_qwen3_ones(pipe) -> None:
    """The route lora_attach.split_by_loader gives: AnimaModularPipeline.load_lora_weights takes `transformer` (and
    `text_conditioner`) keys, not `text_encoder` ones."""
    state = load_file(str(FIXTURE / "tiny-step00000004.safetensors"))
    peft = anima_keys.to_diffusers(state)
    base = generate(pipe, prompt=PROMPTS)
    for_pipe, others = lora_attach.split_by_loader(peft, pipe)
    assert set(others) == {"text_encoder"} and all(k.startswith("transformer.") for k in for_pipe)
    pipe.load_lora_weights(for_pipe, adapter_name="ckpt")
    lora_attach.attach(pipe.text_encoder, others["text_encoder"], "ckpt")
    applied = generate(pipe, prompt=PROMPTS)
    pipe.delete_adapters("ckpt")
    lora_attach.detach(pipe.text_encoder, "ckpt")
    # the same as applying each model's keys by hand
    pipe.transformer.load_lora_adapter(for_pipe, prefix="transformer", adapter_name="hand")
    lora_attach.attach(pipe.text_encoder, others["text_encoder"], "hand")
    np.testing.assert_array_equal(generate(pipe, prompt=PROMPTS), applied)
    pipe.transformer.delete_adapters("hand")
    lora_attach.detach(pipe.text_encoder, "hand")
    assert np.abs(applied - base).max() > 1e-4
    np.testing.assert_array_equal(generate(pipe, prompt=PROMPTS), base)
