"""A tiny SD3-shaped diffusers pipeline (random weights), built offline: its MMDiT has the block shapes of kohya's
tiny SD3 in tests/fixtures/kohya-families/sd3/model.json (hidden 128, 2 heads, RMS q/k norm, 2 joint blocks, the
last one's text stream pre-only) and its CLIP-L / CLIP-G those of that fixture's text encoders, so kohya's own
SD3 LoRA file applies to it.

Where the fixture's sizes do not reach a LoRA's shapes they are chosen to make a working pipeline: the text
width the transformer reads (`joint_attention_dim`) is CLIP-L + CLIP-G concatenated (64) and T5 as wide, as
in SD3 (4096 there); positions for up to 32 x 32 patches; a 16-channel VAE of two levels (scale 2), so 64 px
images have 32 x 32 latents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lora_monitor.demo.flux_model import CLIP_CONFIG, T5_LAYERS, _t5_vocab, build_t5_tokenizer
from lora_monitor.demo.tokenizer import build_clip_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "kohya-families" / "sd3"
TEXT_WIDTH = 64  # CLIP-L (32) + CLIP-G (32) hidden states, side by side


def transformer_config() -> dict[str, Any]:
    config = json.loads((FIXTURE / "model.json").read_text())["diffusers_equivalent"]["config"]
    return {**config, "sample_size": 32, "pos_embed_max_size": 32, "joint_attention_dim": TEXT_WIDTH}


def make_models() -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609, sample_size=64)
    clip = {**CLIP_CONFIG, "projection_dim": 32}
    t5 = T5Config(vocab_size=len(_t5_vocab()), d_model=TEXT_WIDTH, **T5_LAYERS, decoder_start_token_id=0,
                  pad_token_id=0, eos_token_id=1)
    return {
        "transformer": SD3Transformer2DModel(**transformer_config()),
        "vae": vae,
        "text_encoder": CLIPTextModelWithProjection(CLIPTextConfig(**clip)),
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**{**clip, "hidden_act": "gelu"})),
        "text_encoder_3": T5EncoderModel(t5),
    }


def build_tiny_sd3(dir: Path, seed: int = 0) -> Path:
    """Write a tiny SD3 diffusers folder to `dir` and return it; StableDiffusion3Pipeline.from_pretrained loads it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    dir = Path(dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer(dir / "tokenizer")))
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(shutil.copytree(dir / "tokenizer", dir / "tokenizer_2")))
    tokenizer_3 = T5TokenizerFast.from_pretrained(str(build_t5_tokenizer(dir / "tokenizer_3")))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = make_models()
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), tokenizer=tokenizer,
                                    tokenizer_2=tokenizer_2, tokenizer_3=tokenizer_3, **models)
    pipe.save_pretrained(str(dir), safe_serialization=True)
    return dir
