"""The kohya key mapping of a model family: which module does what, for the families that need one.

SD 1.x/2.x and SDXL files load through diffusers' own kohya converter (formats.py); the transformer families
have a mapping of their own here, since diffusers has none for them or a narrow one (see each module).
"""

from __future__ import annotations

import re
from types import ModuleType

import torch

from lora_monitor.checkpoints import anima_keys, flux_keys, hunyuan_keys, lumina_keys, sd3_keys
from lora_monitor.checkpoints.kohya_keys import Part

MAPPINGS: dict[str, ModuleType] = {"flux": flux_keys, "sd3": sd3_keys, "lumina": lumina_keys,
                                   "hunyuan_image": hunyuan_keys, "anima": anima_keys}


def has_mapping(family: str) -> bool:
    return family in MAPPINGS


def is_kohya(keys: list[str]) -> bool:
    """Whether a LoRA's keys are kohya's (`lora_unet_...lora_down.weight`) rather than diffusers/peft names."""
    return any(re.match(r"lora_(unet|te\d?)_\w+\.lora_down\.weight$", k) for k in keys)


def module_parts(family: str, module: str, down: torch.Tensor, up: torch.Tensor) -> list[Part] | None:
    return MAPPINGS[family].module_parts(module, down, up)


def to_diffusers(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya LoRA of `family` as peft keys its pipeline's load_lora_weights takes; a file already in peft
    form comes back as it is."""
    if family not in MAPPINGS or not is_kohya(list(state)):
        return dict(state)
    return MAPPINGS[family].to_diffusers(state)
