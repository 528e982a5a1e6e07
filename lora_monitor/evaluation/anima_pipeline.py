"""Anima as the evaluator drives every other family: diffusers 0.42 has Anima only as a modular pipeline
(AnimaModularPipeline: a Qwen3 text encoder, an LLM adapter over T5 token ids, a Cosmos DiT, the Qwen-Image VAE),
whose call returns a state unless asked for images, which takes its guidance as a `guider` component and which
has no prompt-embedding arguments. This wraps it: prompts are encoded once per run by the pipeline's own text
step, and each generation runs the pipeline's blocks after that step, with the guidance scale of the call.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch


class AnimaPipeline:
    """An AnimaModularPipeline with the diffusers-pipeline surface the evaluator uses."""

    def __init__(self, full: Any) -> None:
        from diffusers.modular_pipelines import AnimaAutoBlocks

        blocks = AnimaAutoBlocks()
        blocks.sub_blocks.pop("text_encoder")  # the prompt is encoded once, by encode_prompt
        rest = blocks.init_pipeline()
        rest.update_components(**{k: v for k, v in full.components.items() if k in rest._component_specs})
        self.__dict__.update(full=full, rest=rest)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype) -> AnimaPipeline:
        from diffusers.modular_pipelines import ModularPipeline

        full = ModularPipeline.from_pretrained(str(folder))
        if type(full).__name__ != "AnimaModularPipeline":
            raise ValueError(f"{folder} holds a {type(full).__name__}, not an Anima pipeline")
        full.load_components(dtype=dtype)
        return cls(full)

    def __getattr__(self, name: str) -> Any:  # components, LoRA loading, sizes: the modular pipeline's own
        return getattr(self.full, name)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self.full.set_progress_bar_config(**kwargs)
        self.rest.set_progress_bar_config(**kwargs)

    def to(self, device: torch.device | str) -> AnimaPipeline:
        self.full.to(device)
        return self

    def enable_model_cpu_offload(self, device: torch.device | None = None) -> None:
        raise RuntimeError("diffusers' modular Anima pipeline has no CPU offload here; it stays whole on the device")

    def encode_prompt(self, texts: list[str], negative: list[str] | None, device: torch.device) -> dict[str, Any]:
        from diffusers.modular_pipelines.anima.encoders import AnimaTextEncoderStep

        out = AnimaTextEncoderStep.encode_prompt(self.full, prompt=texts, negative_prompt=negative,
                                                 prepare_unconditional_embeds=negative is not None, device=device)
        return {k: v for k, v in out.items() if v is not None}

    def __call__(self, *, guidance_scale: float, **inputs: Any) -> SimpleNamespace:
        from diffusers.guiders import ClassifierFreeGuidance

        if self.rest.guider.guidance_scale != guidance_scale:
            self.rest.update_components(guider=ClassifierFreeGuidance(guidance_scale=guidance_scale))
        return SimpleNamespace(images=self.rest(**inputs, output="images"))
