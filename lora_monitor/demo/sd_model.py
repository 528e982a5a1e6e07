"""A tiny Stable Diffusion 1.x-shaped diffusers pipeline, built offline and deterministically.

Every component has SD 1.x's structure (UNet2DConditionModel, AutoencoderKL, CLIP text model, CLIP
tokenizer, DDIM scheduler) at a size that trains and samples in seconds on a CPU:

- VAE: a real `AutoencoderKL` whose weights are set by hand so that it is (almost exactly) an
  identity: the encoder averages 4x4 pixel blocks into latents (RGB in latent channels 0-2, channel 3
  unused), the decoder repeats each latent pixel 4x4 times. A randomly initialised VAE would turn
  every image into coloured noise, so a colour could never be learnt or measured.
- UNet: channels (32, 64), one layer per block, random weights (seeded).
- Text encoder: a random 2-layer CLIP text model (hidden size 32) with the real CLIP tokenizer.
- Scheduler: DDIM with SD's scaled-linear betas but x0-prediction (`prediction_type="sample"`), which
  lets a LoRA on a random base produce clean colours in a few hundred CPU steps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_monitor.demo.tokenizer import build_clip_tokenizer

LATENT_CHANNELS = 4
VAE_DOWNSCALE = 4  # 64 px images -> 16x16 latents
# Latents are block means of pixels in [-1, 1]; this brings a garment-on-white image to roughly unit scale.
VAE_SCALING_FACTOR = 1.6
CROSS_ATTENTION_DIM = 32

# A large constant carried beside the signal inside each GroupNorm group: it dominates the group's
# variance, so the normalisation scale is (almost) independent of the image. Relative error ~ 1/C^2.
_GROUPNORM_ANCHOR = 1000.0

SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "sample",
}


def _identity_center(weight: torch.Tensor, pairs: list[tuple[int, int, float]]) -> None:
    """Zero a conv weight and set its kernel centre for (out_channel, in_channel, gain) pairs."""
    weight.zero_()
    cy, cx = weight.shape[2] // 2, weight.shape[3] // 2
    for out_ch, in_ch, gain in pairs:
        weight[out_ch, in_ch, cy, cx] = gain


def _average_2x2(weight: torch.Tensor, channels: int) -> None:
    """Set a stride-2 3x3 conv (kohya/diffusers Downsample2D, padded right/bottom) to average 2x2 blocks."""
    weight.zero_()
    for ch in range(channels):
        weight[ch, ch, 0:2, 0:2] = 0.25


def _make_vae() -> torch.nn.Module:
    """Build the near-identity AutoencoderKL (see module docstring)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
    )
    with torch.no_grad():
        # Zeroing everything turns every ResNet and attention block into an identity (their last
        # layers are zero and they are residual); only the paths set below carry the image.
        for p in vae.parameters():
            p.zero_()
        _set_encoder(vae.encoder)
        _identity_center(vae.quant_conv.weight, [(c, c, 1.0) for c in range(2 * LATENT_CHANNELS)])
        # log-variance channels: exp(-30/2) ~ 3e-7, so sampling the latent distribution is its mean
        vae.quant_conv.bias[LATENT_CHANNELS:] = 0.0
        vae.encoder.conv_out.bias[LATENT_CHANNELS:] = -30.0
        _identity_center(vae.post_quant_conv.weight, [(c, c, 1.0) for c in range(LATENT_CHANNELS)])
        _set_decoder(vae.decoder)
    return vae


def _set_encoder(enc: torch.nn.Module) -> None:
    """Encoder: RGB -> (+R, -R, +G, -G, +B, -B, +C, -C) in group 0 -> two 2x2 averages -> latents.

    GroupNorm then SiLU sit before the last conv. With each signal carried as +x and -x the group mean
    is exactly 0, and SiLU(z) - SiLU(-z) = z recovers the normalised signal exactly.
    """
    anchor = _GROUPNORM_ANCHOR
    pairs = []
    for rgb in range(3):
        pairs += [(2 * rgb, rgb, 1.0), (2 * rgb + 1, rgb, -1.0)]
    _identity_center(enc.conv_in.weight, pairs)
    enc.conv_in.bias[6], enc.conv_in.bias[7] = anchor, -anchor
    _average_2x2(enc.down_blocks[0].downsamplers[0].conv.weight, 16)
    _identity_center(enc.down_blocks[1].resnets[0].conv_shortcut.weight, [(c, c, 1.0) for c in range(16)])
    _average_2x2(enc.down_blocks[1].downsamplers[0].conv.weight, 32)
    # group 0 holds 8 channels: 6 signal (|x| <= 1) and 2 anchors, so its std is ~ anchor / 2
    sigma = anchor / 2.0
    enc.conv_norm_out.weight[:6] = sigma
    _identity_center(enc.conv_out.weight, [])
    for rgb in range(3):
        enc.conv_out.weight[rgb, 2 * rgb, 1, 1] = 1.0
        enc.conv_out.weight[rgb, 2 * rgb + 1, 1, 1] = -1.0


def _set_decoder(dec: torch.nn.Module) -> None:
    """Decoder: latents -> groups of (+x, -x, +C, -C) for x in R, G, B -> nearest upsampling -> RGB."""
    anchor = _GROUPNORM_ANCHOR
    pairs = []
    for rgb in range(3):
        base = 4 * rgb
        pairs += [(base, rgb, 1.0), (base + 1, rgb, -1.0)]
        dec.conv_in.bias[base + 2], dec.conv_in.bias[base + 3] = anchor, -anchor
    _identity_center(dec.conv_in.weight, pairs)
    for block in (0, 1):
        _identity_center(dec.up_blocks[block].upsamplers[0].conv.weight, [(c, c, 1.0) for c in range(32)])
    _identity_center(dec.up_blocks[2].resnets[0].conv_shortcut.weight, [(c, c, 1.0) for c in range(16)])
    # each group of 4 channels: 2 signal and 2 anchors, so its std is ~ anchor / sqrt(2)
    sigma = anchor / 2.0**0.5
    _identity_center(dec.conv_out.weight, [])
    for rgb in range(3):
        base = 4 * rgb
        dec.conv_norm_out.weight[base : base + 2] = sigma
        dec.conv_out.weight[rgb, base, 1, 1] = 1.0
        dec.conv_out.weight[rgb, base + 1, 1, 1] = -1.0


def _make_unet(sample_size: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=4,
    )


def _make_text_encoder() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=CROSS_ATTENTION_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_tiny_sd(dir: Path, seed: int = 0, image_size: int = 64) -> Path:
    """Write a tiny SD 1.x diffusers folder to `dir` and return `dir`.

    `image_size` (pixels, a multiple of 16) only sets the UNet's nominal `sample_size`; the pipeline
    works at any multiple of 16. Same `seed` -> same weight bytes. Loadable with
    `StableDiffusionPipeline.from_pretrained(dir)`.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    dir = Path(dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer(dir / "tokenizer")))
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        unet = _make_unet(image_size // VAE_DOWNSCALE)
        text_encoder = _make_text_encoder()
        vae = _make_vae()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(dir), safe_serialization=True)
    return dir
