"""What differs between model families when the evaluator generates images: one small adapter per family.

The evaluator's loop (groups of prompts, fixed CPU-generator seeds, cached prompt embeddings, LoRA merged while
generating) is the same for every family; only these differ, and each adapter answers them for its pipeline:

- the denoiser a LoRA mostly changes (`unet` for SD 1.x/2.x and SDXL, `transformer` for FLUX.1) and the image
  size when neither a prompt, `[eval]` nor kohya's resolution gives one;
- the sampling defaults when `[eval] steps` / `guidance_scale` are not set: SD's 15 steps at CFG 7.0, FLUX.1's
  20 steps at guidance 3.5 (FLUX.1-dev is guidance-distilled: the scale goes into its guidance embedding, and
  there is no classifier-free guidance, so no negative prompt and one transformer pass per step; BFL's and
  diffusers' reference sampler uses 28-50 steps, 20 keeps the images recognisable at 2/3 of the cost);
  FLUX.1-schnell (no guidance embedding) 4 steps, as it was distilled for;
- how prompts become embeddings: SD's `encode_prompt` gives (positive, negative[, pooled, negative pooled]),
  FLUX's gives T5's sequence embeddings and CLIP-L's pooled vector (its text ids are rebuilt by the pipeline);
- the dtype on a GPU: FLUX's T5-XXL and transformer overflow in fp16, so bf16 (fp32 where bf16 is missing).
"""

from __future__ import annotations

from typing import Any

import torch

from lora_monitor.errors import UserError

SD_STEPS, SD_GUIDANCE = 15, 7.0
FLUX_STEPS, FLUX_GUIDANCE = 20, 3.5
SCHNELL_STEPS = 4
FLUX_DEV_TOKENS, FLUX_SCHNELL_TOKENS = 512, 256  # T5 tokens, as kohya's flux_train_network.py and diffusers use


class SDAdapter:
    """SD 1.x/2.x and SDXL: UNet, CLIP text encoder(s), classifier-free guidance with a negative prompt."""

    family = "sd"
    denoiser_name = "unet"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def default_steps(self) -> int:
        return SD_STEPS

    def default_guidance(self) -> float:
        return SD_GUIDANCE

    def negative(self, text: str) -> str:
        return text

    def encode(self, texts: list[str], device: torch.device, guidance: float, negative: str) -> dict[str, Any]:
        do_cfg = guidance > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None
        out = self.pipe.encode_prompt(
            prompt=texts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=[negative] * len(texts) if negative else None,
        )
        names = ["prompt_embeds", "negative_prompt_embeds"]
        if len(out) == 4:  # SDXL adds the pooled embeddings of its second text encoder
            names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        return {n: t for n, t in zip(names, out, strict=True) if t is not None}

    def call_kwargs(self) -> dict[str, Any]:
        return {}

    def check_scheduler(self, name: str) -> None:
        return None


class FluxAdapter(SDAdapter):
    """FLUX.1: a transformer with a guidance embedding (dev) or none (schnell), T5-XXL + CLIP-L, flow matching."""

    family = "flux"
    denoiser_name = "transformer"

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.pipe.transformer.config.guidance_embeds)

    def default_size(self) -> int:
        return int(self.pipe.default_sample_size * self.pipe.vae_scale_factor)  # 128 * 8: FLUX.1's 1024 px

    def default_steps(self) -> int:
        return FLUX_STEPS if self.guidance_distilled else SCHNELL_STEPS

    def default_guidance(self) -> float:
        return FLUX_GUIDANCE if self.guidance_distilled else 0.0

    def negative(self, text: str) -> str:
        return ""  # no classifier-free guidance: a negative prompt would be ignored, so it does not split groups

    def max_tokens(self) -> int:
        wanted = FLUX_DEV_TOKENS if self.guidance_distilled else FLUX_SCHNELL_TOKENS
        return min(wanted, int(getattr(self.pipe.tokenizer_2, "model_max_length", wanted) or wanted))

    def encode(self, texts: list[str], device: torch.device, guidance: float, negative: str) -> dict[str, Any]:
        embeds, pooled, _text_ids = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, device=device, num_images_per_prompt=1, max_sequence_length=self.max_tokens()
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def call_kwargs(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_tokens()}

    def check_scheduler(self, name: str) -> None:
        if name != "default":
            raise UserError(f"[eval] scheduler = {name!r}: FLUX.1 samples with its own flow-matching scheduler; "
                            "remove scheduler from [eval] (or set it to 'default')")


ADAPTERS: dict[str, type[SDAdapter]] = {"sd": SDAdapter, "sdxl": SDAdapter, "flux": FluxAdapter}


def adapter_for(pipe: Any, family: str) -> SDAdapter:
    if family not in ADAPTERS:
        raise UserError(f"no evaluation pipeline for the {family} model family yet")
    return ADAPTERS[family](pipe)


def family_dtype(family: str, device: torch.device, sd_dtype: torch.dtype) -> torch.dtype:
    """The dtype the family's weights are loaded in: SD's choice (fp16 on a GPU), bf16 for FLUX on a GPU."""
    if family != "flux" or device.type != "cuda":
        return sd_dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
