"""Which LoRA modules of a file were applied to a model: no checkpoint is scored with part of it silently gone.

diffusers loads a LoRA whose modules partly (or, for some families, not at all) match the model without an
error, and counting adapted layers is no proof either: one fused kohya module can become three diffusers layers.
So each module of the file is matched, by name, to the layers it must reach, and it counts as applied only when
every one of them carries the adapter. Names are compared with `.` written `_`, as kohya writes them.

A file module is one lora_down/lora_up pair (kohya, with an optional alpha) or one lora_A/lora_B pair
(diffusers/peft, after formats.normalize_lora_state).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from lora_monitor.checkpoints import family_keys
from lora_monitor.checkpoints.files import NotALoraError
from lora_monitor.checkpoints.formats import SD_LAYERS_PER_BLOCK, ldm_to_diffusers_unet

Target = tuple[str, str]  # (pipeline component, module path with "." as "_")
SHOWN = 5  # module names a message lists before "and N more"

# kohya text-encoder prefix -> component, per base family; SD 1.x/2.x and SDXL share one table
_SD_PREFIXES = {"lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_SGM_RESNET_LEAVES = {"in_layers_2": "in_layers.2", "emb_layers_1": "emb_layers.1",
                      "out_layers_3": "out_layers.3", "skip_connection": "skip_connection",
                      "in_layers_0": "in_layers.0", "out_layers_0": "out_layers.0"}
_SGM_TOP = {"input_blocks_0_0": "input_blocks.0.0", "time_embed_0": "time_embed.0", "time_embed_2": "time_embed.2",
            "label_emb_0_0": "label_emb.0.0", "label_emb_0_2": "label_emb.0.2", "out_2": "out.2", "out_0": "out.0"}


def _us(path: str) -> str:
    return path.replace(".", "_")


def _target(component: str, path: str) -> Target:
    """(component, underscored path); CLIP's `text_model.` level is dropped, since transformers 5 has no such
    module in CLIPTextModel while kohya's names (written from transformers 4) carry it."""
    path = _us(path)
    if component.startswith("text_encoder"):
        path = path.removeprefix("text_model_")
    return component, path


def sgm_unet_target(name: str, layers_per_block: int = SD_LAYERS_PER_BLOCK) -> str:
    """Diffusers UNet path (underscored) of a kohya SDXL UNet module name, which follows the original (sgm) UNet
    (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`); diffusers-named modules come back unchanged.
    `layers_per_block` is the UNet's (2 in every real SD/SDXL model), as diffusers' loader reads it."""
    if name in _SGM_TOP:
        ldm = _SGM_TOP[name]
    elif m := re.fullmatch(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)", name):
        ldm = f"{m[1]}.{m[2]}.{m[3]}.{_SGM_RESNET_LEAVES.get(m[4], m[4])}"
    elif m := re.fullmatch(r"middle_block_(\d+)_(.+)", name):
        ldm = f"middle_block.{m[1]}.{_SGM_RESNET_LEAVES.get(m[2], m[2])}"
    else:
        return name
    try:
        return _us(ldm_to_diffusers_unet(ldm, layers_per_block))
    except NotALoraError:
        return name  # no such UNet layer: it stays unmatched and is reported


def _kohya_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    return [k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight")]


def _peft_targets(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[Target, ...]]:
    out: dict[str, tuple[Target, ...]] = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            component, _, path = module.partition(".")
            out[module] = (_target(component, path),)
    return out


def _sd_targets(state: Mapping[str, torch.Tensor], layers_per_block: int) -> dict[str, tuple[Target, ...]]:
    out: dict[str, tuple[Target, ...]] = {}
    for name in _kohya_names(state):
        if name.startswith("lora_unet_"):
            out[name] = (("unet", sgm_unet_target(name[len("lora_unet_"):], layers_per_block)),)
            continue
        prefix = next((p for p in _SD_PREFIXES if name.startswith(p)), None)
        out[name] = (_target(_SD_PREFIXES[prefix], name[len(prefix):]),) if prefix else (("?", name),)
    return out


def _mapped_targets(state: Mapping[str, torch.Tensor], family: str) -> dict[str, tuple[Target, ...]]:
    out: dict[str, tuple[Target, ...]] = {}
    for name in _kohya_names(state):
        down, up = state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        parts = family_keys.module_parts(family, name, down, up)
        out[name] = tuple(_target(p.component, p.path) for p in parts) if parts else (("?", name),)
    return out


def expected_targets(
    state: Mapping[str, torch.Tensor], family: str, layers_per_block: int = SD_LAYERS_PER_BLOCK
) -> dict[str, tuple[Target, ...]]:
    """File module name -> the layers it must reach in a pipeline of `family` ('sd', 'sdxl', 'flux', 'sd3', ...).

    `state` is the file's LoRA as formats.normalize_lora_state returns it (kohya names kept, others in peft form);
    `layers_per_block` is the UNet's, for SDXL's original (sgm) UNet names.
    """
    if not any(k.endswith(".lora_down.weight") for k in state):
        return _peft_targets(state)
    if family_keys.has_mapping(family):
        return _mapped_targets(state, family)
    return _sd_targets(state, layers_per_block)


def adapted_targets(models: Mapping[str, torch.nn.Module], adapter: str) -> set[Target]:
    """Every layer of the pipeline's `models` (component -> module) that carries LoRA weights of `adapter`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found: set[Target] = set()
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, BaseTunerLayer) and any(
                adapter in getattr(module, attr, {}) for attr in module.adapter_layer_names
            ):
                found.add(_target(component, name))
    return found


def left_over(expected: Mapping[str, tuple[Target, ...]], adapted: set[Target]) -> list[str]:
    """File modules (sorted) not applied: at least one of their layers lacks the adapter."""
    return sorted(name for name, targets in expected.items() if not set(targets) <= adapted)


def name_some(names: list[str], shown: int = SHOWN) -> str:
    """'a, b, c' or 'a, b, c, d, e and 7 more'."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"
