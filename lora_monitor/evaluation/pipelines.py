"""What differs between model families when the evaluator generates images: one small adapter per family.

The evaluator's loop (groups of prompts, fixed CPU-generator seeds, cached prompt embeddings, LoRA merged while
generating) is the same for every family; only these differ, and each adapter answers them for its pipeline:

- the denoiser a LoRA mostly changes (`unet` for SD 1.x/2.x and SDXL, `transformer` for FLUX.1 and SD3.x) and
  the image size when neither a prompt, `[eval]` nor kohya's resolution gives one;
- the sampling defaults when `[eval] steps` / `guidance_scale` are not set: SD's 15 steps at CFG 7.0, FLUX.1's
  20 steps at guidance 3.5 (FLUX.1-dev is guidance-distilled: the scale goes into its guidance embedding, and
  there is no classifier-free guidance, so no negative prompt and one transformer pass per step; BFL's and
  diffusers' reference sampler uses 28-50 steps, 20 keeps the images recognisable at 2/3 of the cost);
  FLUX.1-schnell (no guidance embedding) 4 steps, as it was distilled for; SD3.x 28 steps (Stability's and
  diffusers' reference count; SD3.5-medium's 40 cut to 28) at the CFG scale its model card gives: SD3-medium
  7.0, SD3.5-large 3.5, SD3.5-medium 4.5 (told apart by the transformer: no q/k norm in SD3-medium,
  dual-attention layers in SD3.5-medium); Lumina 2 the pipeline's own 30 steps at CFG 4.0;
- how prompts become embeddings: SD's `encode_prompt` gives (positive, negative[, pooled, negative pooled]),
  FLUX's gives T5's sequence embeddings and CLIP-L's pooled vector (its text ids are rebuilt by the pipeline),
  SD3's gives the CLIP-L + CLIP-G + T5 sequence and the two CLIPs' pooled vectors, each with a negative,
  Lumina 2's Gemma2's sequence and its attention mask (the prompt behind kohya's system prompt, as kohya trains);
- the dtype on a GPU: FLUX's and SD3's T5-XXL, Lumina's Gemma2 and these transformers overflow in fp16, so bf16
  (fp32 where bf16 is missing).
"""

from __future__ import annotations

from typing import Any

import torch

from lora_monitor.errors import UserError

SD_STEPS, SD_GUIDANCE = 15, 7.0
FLUX_STEPS, FLUX_GUIDANCE = 20, 3.5
SCHNELL_STEPS = 4
SD3_STEPS, SD3_TOKENS = 28, 256  # T5 tokens: diffusers' and kohya's sd3 default
SD3_GUIDANCE = {"sd3-medium": 7.0, "sd3.5-large": 3.5, "sd3.5-medium": 4.5}
LUMINA_STEPS, LUMINA_GUIDANCE, LUMINA_TOKENS = 30, 4.0, 256  # Lumina2Pipeline's own defaults (kohya: 256 tokens)
HUNYUAN_STEPS, HUNYUAN_DISTILLED_STEPS, HUNYUAN_DISTILLED_GUIDANCE = 50, 8, 3.25  # HunyuanImagePipeline's defaults
ANIMA_STEPS = 50  # the modular Anima pipeline's default
FLUX_DEV_TOKENS, FLUX_SCHNELL_TOKENS = 512, 256  # T5 tokens, as kohya's flux_train_network.py and diffusers use


class SDAdapter:
    """SD 1.x/2.x and SDXL: UNet, CLIP text encoder(s), classifier-free guidance with a negative prompt."""

    family = "sd"
    label = "SD"
    denoiser_name = "unet"
    flow_matching = False  # the schedulers of [eval] scheduler are SD's; flow-matching families keep their own
    bf16 = False  # on a GPU: SD's choice of dtype (fp16) is kept

    def __init__(self, pipe: Any, system_prompt: str = "") -> None:
        self.pipe = pipe
        self.system_prompt = system_prompt  # Lumina 2's; the other families have none

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

    def guidance_kwargs(self, scale: float) -> dict[str, Any]:
        """What the pipeline call takes for the guidance `scale` of a group of prompts."""
        return {"guidance_scale": scale}

    def check_scheduler(self, name: str) -> None:
        if name != "default" and self.flow_matching:
            raise UserError(f"[eval] scheduler = {name!r}: {self.label} samples with its own flow-matching "
                            "scheduler; remove scheduler from [eval] (or set it to 'default')")


class TransformerAdapter(SDAdapter):
    """What the transformer families share: the denoiser is `transformer`, sampling is flow matching with the
    model's own scheduler, the default size is the pipeline's `default_sample_size` latents, and the weights are
    bf16 on a GPU (their T5 / LLM text encoders and transformers overflow in fp16)."""

    denoiser_name = "transformer"
    flow_matching = True
    bf16 = True

    def default_size(self) -> int:
        return int(self.pipe.default_sample_size * self.pipe.vae_scale_factor)  # e.g. 128 * 8: 1024 px


class FluxAdapter(TransformerAdapter):
    """FLUX.1: a transformer with a guidance embedding (dev) or none (schnell), T5-XXL + CLIP-L, flow matching."""

    family = "flux"
    label = "FLUX.1"

    @property
    def guidance_distilled(self) -> bool:
        return bool(self.pipe.transformer.config.guidance_embeds)

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


class SD3Adapter(TransformerAdapter):
    """SD3.x: an MMDiT transformer, CLIP-L + CLIP-G + T5-XXL, flow matching with classifier-free guidance."""

    family = "sd3"
    label = "SD3"

    def variant(self) -> str:
        config = self.pipe.transformer.config
        if not config.qk_norm:
            return "sd3-medium"
        return "sd3.5-medium" if config.dual_attention_layers else "sd3.5-large"

    def default_steps(self) -> int:
        return SD3_STEPS

    def default_guidance(self) -> float:
        return SD3_GUIDANCE[self.variant()]

    def max_tokens(self) -> int:
        tokenizer = getattr(self.pipe, "tokenizer_3", None)
        return min(SD3_TOKENS, int(getattr(tokenizer, "model_max_length", SD3_TOKENS) or SD3_TOKENS))

    def encode(self, texts: list[str], device: torch.device, guidance: float, negative: str) -> dict[str, Any]:
        out = self.pipe.encode_prompt(
            prompt=texts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=guidance > 1.0,
            negative_prompt=[negative] * len(texts) if negative else None,
            max_sequence_length=self.max_tokens(),
        )
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
        return {n: t for n, t in zip(names, out, strict=True) if t is not None}


class LuminaAdapter(TransformerAdapter):
    """Lumina 2: a NextDiT transformer, a Gemma2 text encoder (prompts behind the pipeline's system prompt, padded
    to 256 tokens with an attention mask), flow matching with classifier-free guidance."""

    family = "lumina"
    label = "Lumina 2"

    def default_steps(self) -> int:
        return LUMINA_STEPS

    def default_guidance(self) -> float:
        return LUMINA_GUIDANCE

    def encode(self, texts: list[str], device: torch.device, guidance: float, negative: str) -> dict[str, Any]:
        # kohya trains on `<system prompt> <Prompt Start> <caption>`, or the bare caption when its --system_prompt
        # is "" (its default); diffusers' encode_prompt always adds the marker, so the positive text is built here
        # as kohya builds it and encoded by the pipeline's own Gemma2 step. The negative stays bare, as in both.
        system = self.system_prompt
        texts = [f"{system} <Prompt Start> {t}" if system else t for t in texts]
        embeds, mask = self.pipe._get_gemma_prompt_embeds(prompt=texts, device=device,
                                                          max_sequence_length=LUMINA_TOKENS)
        out = self.pipe.encode_prompt(
            prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt=[negative] * len(texts),
            do_classifier_free_guidance=guidance > 1.0, num_images_per_prompt=1, device=device,
            max_sequence_length=LUMINA_TOKENS,
        )
        names = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
        return {n: t for n, t in zip(names, out, strict=True) if t is not None}


class HunyuanImageAdapter(TransformerAdapter):
    """HunyuanImage 2.1: a double/single-block transformer, Qwen2.5-VL for the prompt and ByT5 for its quoted text,
    guidance by the pipeline's guider objects (classifier-free, then adaptive projected), no `guidance_scale`
    argument; the distilled model (guidance embedding) takes `distilled_guidance_scale` instead."""

    family = "hunyuan_image"
    label = "HunyuanImage 2.1"

    @property
    def distilled(self) -> bool:
        return bool(self.pipe.transformer.config.guidance_embeds)

    def default_steps(self) -> int:
        return HUNYUAN_DISTILLED_STEPS if self.distilled else HUNYUAN_STEPS

    def default_guidance(self) -> float:
        if self.distilled:
            return HUNYUAN_DISTILLED_GUIDANCE
        guider = getattr(self.pipe, "guider", None)  # the model's own guider_config.json
        return float(guider.guidance_scale) if guider is not None else 1.0

    def negative(self, text: str) -> str:
        return "" if self.distilled else text

    def encode(self, texts: list[str], device: torch.device, guidance: float, negative: str) -> dict[str, Any]:
        names = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")
        n = len(texts)
        out = dict(zip(names, self.pipe.encode_prompt(prompt=texts, device=device, batch_size=n), strict=True))
        if guidance > 1.0 and not self.distilled:
            negatives = self.pipe.encode_prompt(prompt=[negative] * n, device=device, batch_size=n)
            out.update({f"negative_{n}": t for n, t in zip(names, negatives, strict=True)})
        return out

    def guidance_kwargs(self, scale: float) -> dict[str, Any]:
        if self.distilled:
            return {"distilled_guidance_scale": scale}
        for name in ("guider", "ocr_guider"):  # ocr_guider serves prompts with quoted text
            guider = getattr(self.pipe, name, None)
            if guider is not None and guider.guidance_scale != scale:
                setattr(self.pipe, name, guider.new(guidance_scale=scale))
        return {}


class AnimaAdapter(TransformerAdapter):
    """Anima (evaluation/anima_pipeline.py): a Cosmos DiT, Qwen3 states and T5 ids for its LLM adapter, flow
    matching with classifier-free guidance set through the pipeline's guider."""

    family = "anima"
    label = "Anima"

    def default_steps(self) -> int:
        return ANIMA_STEPS

    def default_guidance(self) -> float:
        return float(self.pipe.full.guider.guidance_scale)  # the model's own guider config (4.0 by default)

    def encode(self, texts: list[str], device: torch.device, guidance: float, negative: str) -> dict[str, Any]:
        return self.pipe.encode_prompt(texts, [negative] * len(texts) if guidance > 1.0 else None, device)


ADAPTERS: dict[str, type[SDAdapter]] = {"sd": SDAdapter, "sdxl": SDAdapter, "flux": FluxAdapter, "sd3": SD3Adapter,
                                        "lumina": LuminaAdapter, "hunyuan_image": HunyuanImageAdapter,
                                        "anima": AnimaAdapter}


def adapter_for(pipe: Any, family: str, system_prompt: str = "") -> SDAdapter:
    if family not in ADAPTERS:
        raise UserError(f"no evaluation pipeline for the {family} model family yet")
    return ADAPTERS[family](pipe, system_prompt)


def family_dtype(family: str, device: torch.device, sd_dtype: torch.dtype) -> torch.dtype:
    """The dtype the family's weights are loaded in: SD's choice (fp16 on a GPU), bf16 on a GPU for the transformer
    families (their adapter's `bf16`)."""
    if not ADAPTERS.get(family, SDAdapter).bf16 or device.type != "cuda":
        return sd_dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
