"""Model families kohya sd-scripts trains LoRAs for, and how a run or a LoRA file says which one it is.

A family is known three ways: from the kohya script a run launches (`[kohya] script`), from the
`ss_base_model_version` (else `modelspec.architecture`) metadata kohya writes into every LoRA file, and from the
layout of the file's keys (kohya names modules after the model's own attributes, so each family's names differ:
FLUX's `double_blocks_N_img_attn_qkv`, SD3's `joint_blocks_N_...`, Lumina's `context_refiner_N_...`).
Metadata values are those the trainers write (kohya commit 48d368f: sd_v1, sd_v2, sdxl_base_v1-0, flux1,
5-large / 3-medium, lumina2, anima, hunyuan-image-2.1) plus the spellings other tools use for SD and SDXL.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePath


@dataclass(frozen=True)
class Family:
    name: str  # short id: "sd", "sdxl", "flux", ...
    label: str  # what a user calls it
    script: str  # kohya's LoRA trainer for it
    supported: bool  # lora-monitor evaluates LoRAs of this family


FAMILIES = (
    Family("sd", "SD 1.x/2.x", "train_network.py", True),
    Family("sdxl", "SDXL", "sdxl_train_network.py", True),
    Family("flux", "FLUX.1", "flux_train_network.py", True),
    Family("sd3", "SD3.x", "sd3_train_network.py", True),
    Family("lumina", "Lumina 2", "lumina_train_network.py", True),
    Family("anima", "Anima", "anima_train_network.py", True),
    Family("hunyuan_image", "HunyuanImage 2.1", "hunyuan_image_train_network.py", True),
    Family("flux2", "FLUX.2", "", False),  # only ever named by a file's metadata (other trainers)
)
BY_NAME = {f.name: f for f in FAMILIES}
BY_SCRIPT = {f.script: f for f in FAMILIES if f.script}


def label(name: str | None) -> str:
    return BY_NAME[name].label if name in BY_NAME else "an unknown model family"


def supported_text() -> str:
    """'SD 1.x/2.x (train_network.py), SDXL (sdxl_train_network.py)'."""
    return ", ".join(f"{f.label} ({f.script})" for f in FAMILIES if f.supported)


def family_of_script(script: str | None, sdxl: bool = False) -> Family | None:
    """The family of a kohya trainer script (a path or a name); None for a script kohya does not ship."""
    if not script:
        return BY_NAME["sdxl" if sdxl else "sd"]
    return BY_SCRIPT.get(PurePath(script).name)


def run_family(script: str | None, sdxl: bool) -> str:
    """The family a `[kohya]` run trains: its script's, else (a script of one's own) `sdxl` decides."""
    family = family_of_script(script, sdxl)
    return family.name if family else ("sdxl" if sdxl else "sd")


def check_run(script: str | None, sdxl: bool) -> str | None:
    """One line saying why `[kohya]` script/sdxl cannot be evaluated, or None when it can."""
    family = family_of_script(script, sdxl)
    if family is None:
        return None
    if not family.supported:
        return (f"kohya.script = {script!r} trains {family.label} LoRAs, which lora-monitor cannot evaluate yet "
                f"(it would score the unchanged base model); supported: {supported_text()}")
    if sdxl and family.name == "sd" and script:
        return (f"kohya.sdxl = true but kohya.script = {script!r} trains SD 1.x/2.x LoRAs; use "
                "sdxl_train_network.py, or drop sdxl")
    return None


# ---------------------------------------------------------------------------------------------- metadata
_VERSIONS = (  # (pattern on the lower-cased ss_base_model_version, family); first match wins
    (r"sdxl", "sdxl"),
    (r"(sd_v?[12]|ss_v[12]|sd[12]|sd_[12]\.)", "sd"),
    (r"flux[._-]?2", "flux2"),
    (r"flux", "flux"),
    (r"(sd3|sd_3|3-medium|3\.5|5-large|5-medium|3-5-|stable-diffusion-3)", "sd3"),
    (r"lumina", "lumina"),
    (r"anima", "anima"),
    (r"hunyuan[-_ ]?image", "hunyuan_image"),
)
_ARCHITECTURES = (  # modelspec.architecture, e.g. "flux-1-dev/lora"
    (r"stable-diffusion-xl", "sdxl"),
    (r"stable-diffusion-v[12]", "sd"),
    (r"stable-diffusion-3", "sd3"),
    (r"flux-?2", "flux2"),
    (r"flux", "flux"),
    (r"lumina", "lumina"),
    (r"anima", "anima"),
    (r"hunyuan-?image", "hunyuan_image"),
)


def family_of_metadata(metadata: Mapping[str, str] | None) -> str | None:
    """The family a LoRA file's metadata names, or None when it names none this module knows."""
    metadata = metadata or {}
    for key, table in (("ss_base_model_version", _VERSIONS), ("modelspec.architecture", _ARCHITECTURES)):
        value = str(metadata.get(key) or "").strip().lower()
        for pattern, name in table if value else ():
            if re.match(pattern, value):
                return name
    return None


# ---------------------------------------------------------------------------------------------- key layout
_KEY_MARKERS = (  # (regex searched in a module name, family); each is a name only that family's network writes
    (r"^lora_unet_(double|single)_blocks_\d+_(img_mlp_fc|txt_mlp_fc|img_mod_linear|txt_mod_linear|modulation_linear)",
     "hunyuan_image"),
    (r"^lora_unet_(double|single)_blocks_\d+_", "flux"),
    (r"^lora_unet_joint_blocks_\d+_", "sd3"),
    (r"^lora_unet_(context_refiner|noise_refiner|cap_embedder)_", "lumina"),
    (r"^lora_unet_layers_\d+_(attention|feed_forward|adaLN)", "lumina"),
    (r"^lora_unet_(llm_adapter_)?blocks_\d+_(self_attn|cross_attn|mlp|adaln)", "anima"),
    (r"^(transformer\.)?(transformer_blocks|single_transformer_blocks)\.\d+\.(attn\.add_q_proj|proj_mlp)", "flux"),
    (r"^lora_unet_(input_blocks|middle_block|output_blocks)_", "sdxl"),
    (r"^lora_te2_text_model_", "sdxl_te"),  # SDXL's CLIP-G, but SD3 writes CLIP-G under lora_te2_ too
    (r"^lora_unet_(down_blocks|mid_block|up_blocks)_", "sd_or_sdxl"),
    (r"^lora_te1?_text_model_", "sd_or_sdxl"),  # SD's only and SDXL's first text encoder (CLIP-L) alike
)


def family_of_keys(keys: Iterable[str]) -> str | None:
    """The family a LoRA's key layout shows; None when the names fit more than one (diffusers-named SD/SDXL UNet
    modules alone) or none."""
    found: set[str] = set()
    for key in keys:
        for pattern, name in _KEY_MARKERS:
            if re.search(pattern, key):
                found.add(name)
                break
    if "hunyuan_image" in found:
        found.discard("flux")  # HunyuanImage's blocks share FLUX's double/single block names but for the MLP
    weak = {"sd_or_sdxl", "sdxl_te"}  # text-encoder and diffusers-named UNet modules several families share
    if found - weak:
        found -= weak
    elif "sdxl_te" in found:
        return "sdxl"
    else:
        return None  # diffusers-named UNet / CLIP modules alone: SD 1.x/2.x or SDXL
    return found.pop() if len(found) == 1 else None


def family_of_lora(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str | None:
    """The family of a LoRA file: its metadata when that names one, else its key layout."""
    return family_of_metadata(metadata) or family_of_keys(keys)


def mismatch(lora_family: str | None, base_family: str) -> str | None:
    """A note naming both families when a LoRA is not for the base model's family; None when it may fit."""
    if lora_family is None or lora_family == base_family:
        return None
    return (f"a LoRA for {label(lora_family)} cannot be applied to this run's {label(base_family)} base model; "
            f"evaluate it with a {label(lora_family)} base model")


def pipeline_family(pipe: object) -> str:
    """The family of a loaded diffusers pipeline, from its class."""
    return family_of_pipeline_class(type(pipe).__name__)


def family_of_model_folder(path: str | PurePath | None) -> str | None:
    """The family of a diffusers model folder, from the pipeline class its `model_index.json` names; None when
    `path` is no such folder (a hub id, a single file, no or an unreadable model_index.json)."""
    import json
    from pathlib import Path

    name = None
    for index in ("model_index.json", "modular_model_index.json"):  # a modular pipeline's (Anima) names its class
        try:
            name = json.loads((Path(str(path)) / index).read_text(encoding="utf-8")).get("_class_name")
            break
        except (OSError, ValueError, AttributeError, TypeError):
            continue
    return family_of_pipeline_class(name) if isinstance(name, str) and name else None


def family_of_pipeline_class(name: str) -> str:
    """The family of a diffusers pipeline class name ("FluxPipeline" -> "flux"); SD for any other."""
    for marker, family in (("XL", "sdxl"), ("Flux2", "flux2"), ("Flux", "flux"), ("StableDiffusion3", "sd3"),
                           ("Lumina", "lumina"), ("HunyuanImage", "hunyuan_image"), ("Anima", "anima")):
        if marker in name:
            return family
    return "sd"
