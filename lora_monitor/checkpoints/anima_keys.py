"""kohya's Anima LoRA names -> diffusers' CosmosTransformer3DModel, AnimaTextConditioner and Qwen3 modules.

kohya (networks/lora_anima.py) names each module after the original Anima DiT (library/anima_models.py):
`lora_unet_` + the Linear's path with `_` for `.`. In each `blocks_N_` block: `self_attn_` / `cross_attn_` +
`q_proj`, `k_proj`, `v_proj`, `output_proj`, and `mlp_layer1`, `mlp_layer2`. kohya always adds the exclude pattern
`.*(_modulation|_norm|_embedder|final_layer).*` (matched against the dotted path), so the block modulations
(`adaln_modulation_self_attn_1/2`, `..._cross_attn_1/2`, `..._mlp_1/2`), the patch embedding (`x_embedder_proj_1`),
the timestep MLP (`t_embedder_1_linear_1/2`) and the final layer (`final_layer_linear`,
`final_layer_adaln_modulation_1/2`) are written only when a user's `include_patterns` brings them back; they map
all the same. With `train_llm_adapter=true` the LLM adapter's blocks are trained too
(`llm_adapter_blocks_N_self_attn_q_proj` ... `o_proj`, `..._cross_attn_...`, `llm_adapter_blocks_N_mlp_0/2`): kohya
still prefixes them `lora_unet_`, but diffusers keeps that adapter apart, as the AnimaModularPipeline's
`text_conditioner` component (an AnimaTextConditioner with the same inner names).

Every kohya layer is one diffusers layer (diffusers' own converter of Anima's original names,
`_convert_non_diffusers_anima_lora_to_diffusers`, renames one for one, as here), and the modulations chunk their
output the same way in both: (shift, scale, gate) per block, (shift, scale) in the final layer, so no rows move.
Anima's blocks use adaLN-LoRA (a down Linear `_1` then an up Linear `_2`), as CosmosAdaLayerNormZero always does; a
model built without it has one `_1` Linear of 3 x hidden rows (2 x in the final layer) that diffusers has no layer
for, so such a module maps to none rather than to the low-rank `linear_1`.

`lora_te_` is the Qwen3 text encoder, which kohya loads as Qwen3ForCausalLM(...).model, a Qwen3Model: the
pipeline's `text_encoder` is a Qwen3Model too, so `lora_te_layers_N_self_attn_q_proj` is `layers.N.self_attn.q_proj`
(no `model.` level). AnimaModularPipeline.load_lora_weights takes `transformer` and `text_conditioner` only; the
evaluator applies the text encoder's modules with peft itself (evaluation/lora_attach.py).
"""

from __future__ import annotations

import re

import torch

from lora_monitor.checkpoints.kohya_keys import Part, direct, module_parts_of, to_peft

TEXT_ENCODER_PREFIX = "lora_te_"
TEXT_ENCODER = "text_encoder"
TEXT_CONDITIONER = "text_conditioner"
_ATTN = {"self_attn": "attn1", "cross_attn": "attn2"}
_PROJ = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "output_proj": "to_out.0"}
_NORM = {"self_attn": "norm1", "cross_attn": "norm2", "mlp": "norm3"}

# kohya name after `lora_unet_` -> CosmosTransformer3DModel path ({0}: block index, {1}: 1 or 2 where matched)
_DIRECT = (
    *((rf"blocks_(\d+)_{attn}_{proj}", f"transformer_blocks.{{0}}.{ours}.{theirs}")
      for attn, ours in _ATTN.items() for proj, theirs in _PROJ.items()),
    (r"blocks_(\d+)_mlp_layer1", "transformer_blocks.{0}.ff.net.0.proj"),
    (r"blocks_(\d+)_mlp_layer2", "transformer_blocks.{0}.ff.net.2"),
    *((rf"blocks_(\d+)_adaln_modulation_{kind}_([12])", f"transformer_blocks.{{0}}.{norm}.linear_{{1}}")
      for kind, norm in _NORM.items()),
    (r"final_layer_adaln_modulation_([12])", "norm_out.linear_{0}"),
    (r"final_layer_linear", "proj_out"),
    (r"x_embedder_proj_1", "patch_embed.proj"),
    (r"t_embedder_1_linear_([12])", "time_embed.t_embedder.linear_{0}"),
)

# the LLM adapter (after `lora_unet_llm_adapter_`) -> AnimaTextConditioner path
_ADAPTER = (
    (r"blocks_(\d+)_(self_attn|cross_attn)_(q_proj|k_proj|v_proj|o_proj)", "blocks.{0}.{1}.{2}"),
    (r"blocks_(\d+)_mlp_([02])", "blocks.{0}.mlp.{1}"),
)

# Qwen3Model module names (underscored by kohya) -> dotted paths; the leaf attributes keep their own `_`
_QWEN3 = ((r"layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
           "layers.{0}.{1}.{2}"),)


def _plain_modulation(name: str, out_rows: int, in_features: int) -> bool:
    """A modulation's `_1` Linear of a model without adaLN-LoRA: hidden -> chunks x hidden in one layer."""
    if m := re.fullmatch(r"(blocks_\d+_adaln_modulation_\w+|final_layer_adaln_modulation)_1", name):
        return out_rows == (2 if m[1] == "final_layer_adaln_modulation" else 3) * in_features
    return False


def transformer_parts(name: str, out_rows: int, in_features: int) -> list[Part] | None:
    """The diffusers layers of kohya Anima module `name` (without `lora_unet_`); None when unknown.

    `out_rows` is the module's up-matrix row count, `in_features` its down matrix's column count.
    """
    if name.startswith("llm_adapter_"):
        return direct(_ADAPTER, name[len("llm_adapter_"):], TEXT_CONDITIONER, out_rows)
    if _plain_modulation(name, out_rows, in_features):
        return None
    return direct(_DIRECT, name, "transformer", out_rows)


# the diffusers layers of a kohya Anima module name (with its prefix); None when the name maps to none
module_parts = module_parts_of(transformer_parts, {TEXT_ENCODER_PREFIX: TEXT_ENCODER}, _QWEN3)


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya Anima LoRA as peft keys: `transformer.*` and `text_conditioner.*` for
    AnimaModularPipeline.load_lora_weights, `text_encoder.*` for the Qwen3 encoder, which that loader does not take;
    diffusers 0.42 maps none of kohya's `lora_unet_`/`lora_te_` names and applies nothing without an error."""
    return to_peft(state, module_parts)
