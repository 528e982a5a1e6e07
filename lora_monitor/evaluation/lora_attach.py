"""LoRA weights for the models a pipeline's own loader does not take: its T5 or Gemma text encoder, or every model
of a pipeline without `load_lora_weights` (HunyuanImage).

diffusers' loaders take a fixed list of components per pipeline (`_lora_loadable_modules`: FluxPipeline and
StableDiffusion3Pipeline no T5, Lumina2Pipeline no text encoder at all) and skip other keys. Such a key is
applied here with peft directly, as diffusers itself does underneath: a LoRA layer injected into each named
module under the checkpoint's adapter name, then its A and B weights set. Keys are peft's
(`<component>.<module path>.lora_A.weight`), the scale alpha/rank already folded into B (kohya_keys.to_peft), so
every layer gets lora_alpha = r.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch


def loadable_components(pipe: Any) -> tuple[str, ...]:
    """The components `pipe.load_lora_weights` takes; none for a pipeline without it."""
    if not hasattr(pipe, "load_lora_weights"):
        return ()
    return tuple(getattr(pipe, "_lora_loadable_modules", ()))


def split_by_loader(state: dict[str, torch.Tensor], pipe: Any) -> tuple[dict[str, torch.Tensor],
                                                                         dict[str, dict[str, torch.Tensor]]]:
    """(keys for pipe.load_lora_weights, {component: its keys without the component prefix} for `attach`).

    A state with keys in kohya's or another non-peft form goes to the pipeline whole: its converters read them."""
    own = loadable_components(pipe)
    if not all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state):
        return dict(state), {}
    for_pipe: dict[str, torch.Tensor] = {}
    others: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component in own:
            for_pipe[key] = tensor
        else:
            others.setdefault(component, {})[rest] = tensor
    return for_pipe, others


def attach(model: torch.nn.Module, state: dict[str, torch.Tensor], adapter: str) -> None:
    """Inject adapter `adapter` into the modules `state` names (`<path>.lora_A.weight` / `.lora_B.weight`) and set
    its weights. Raises ValueError naming a module the model lacks or a shape that does not fit."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    modules = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    ranks = {m: state[f"{m}.lora_A.weight"].shape[0] for m in modules}
    r = Counter(ranks.values()).most_common(1)[0][0]
    odd = {re.escape(m): n for m, n in ranks.items() if n != r}  # modules of another rank, by full name
    config = LoraConfig(r=r, lora_alpha=r, target_modules=modules, rank_pattern=odd, alpha_pattern=odd)
    names = dict(model.named_modules())
    if absent := [m for m in modules if m not in names]:
        raise ValueError(f"{len(absent)} LoRA modules name no layer of the model ({', '.join(absent[:3])})")
    inject_adapter_in_model(config, model, adapter_name=adapter)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    if unexpected := getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA weights not taken by the model: {', '.join(sorted(unexpected)[:3])}")


def detach(model: torch.nn.Module, adapter: str) -> None:
    """Remove adapter `adapter` from every LoRA layer of `model` (its base weights are what stays)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and any(adapter in getattr(module, a, {})
                                                      for a in module.adapter_layer_names):
            module.delete_adapter(adapter)
    config = getattr(model, "peft_config", None)
    if isinstance(config, dict):
        config.pop(adapter, None)
