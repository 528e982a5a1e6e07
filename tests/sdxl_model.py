"""A tiny Stable Diffusion XL-shaped diffusers pipeline, built offline and deterministically.

It has SDXL's structure at a size that loads and samples in a second on a CPU, so SDXL code paths
(two text encoders, pooled text embeddings, size/crop "time ids", kohya's `lora_te1_`/`lora_te2_` keys)
can be tested without the 6.6 GB model:

- UNet: `addition_embed_type="text_time"` like SDXL, blocks laid out like SDXL's (a plain first down
  block, cross-attention below it; the last up block has neither attention nor upsampler), linear
  projections in the transformers, channels (32, 64), one layer per block, random weights (seeded).
- Text encoders: a random `CLIPTextModel` and a random `CLIPTextModelWithProjection` (hidden size 32
  each); the UNet's cross-attention width is their concatenation (64), its added-condition input the
  second encoder's projection (32) plus 6 time ids x 8.
- Tokenizers: the real CLIP tokenizer (SDXL's two tokenizers share the vocabulary).
- VAE and scheduler: the near-identity VAE and x0-prediction DDIM of the SD 1.x demo model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lora_monitor.demo.sd_model import LATENT_CHANNELS, SCHEDULER_CONFIG, VAE_DOWNSCALE, _make_vae
from lora_monitor.demo.tokenizer import build_clip_tokenizer

TEXT_HIDDEN = 32  # hidden size of each text encoder
PROJECTION_DIM = 32  # second encoder's pooled projection (SDXL: 1280)
TIME_EMBED_DIM = 8  # per time id (SDXL: 256)
N_TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)


def _make_unet(sample_size: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_HIDDEN,
        attention_head_dim=4,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=N_TIME_IDS * TIME_EMBED_DIM + PROJECTION_DIM,
    )


def _clip_config(**extra: object) -> object:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def build_tiny_sdxl(dir: Path, seed: int = 0, image_size: int = 64) -> Path:
    """Write a tiny SDXL diffusers folder to `dir` and return `dir`.

    `image_size` (pixels, a multiple of 16) only sets the UNet's nominal `sample_size` (the pipeline's
    default size); any multiple of 16 works. Same `seed` -> same weights. Loadable with
    `StableDiffusionXLPipeline.from_pretrained(dir)`.
    """
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dir = Path(dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer(dir / "tokenizer")))
    # SDXL's two tokenizers share the vocabulary: copy the folder instead of building it twice
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(shutil.copytree(dir / "tokenizer", dir / "tokenizer_2")))
    torch.manual_seed(seed)
    unet = _make_unet(image_size // VAE_DOWNSCALE)
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(projection_dim=PROJECTION_DIM))
    vae = _make_vae()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        add_watermarker=False,
    )
    pipe.save_pretrained(str(dir), safe_serialization=True)
    return dir
