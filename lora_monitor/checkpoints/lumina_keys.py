"""kohya's Lumina 2 LoRA names -> diffusers' Lumina2Transformer2DModel / Gemma2 modules, at any model width.

kohya (networks/lora_lumina.py) names each module after the original NextDiT (library/lumina_models.py):
`lora_unet_` + the Linear's path with `_` for `.`, in the `layers_N_`, `noise_refiner_N_` and `context_refiner_N_`
blocks (`attention_qkv`, `attention_out`, `feed_forward_w1/w2/w3`, `adaLN_modulation_1`; the context refiner has
no modulation) and the final layer (`final_layer_linear`, `final_layer_adaLN_modulation_1`). With `embedder_dims`
the embedders are trained too (`x_embedder`, `t_embedder_mlp_0/2`, `cap_embedder_1`). `lora_te_` is the Gemma2
text encoder (`lora_te_layers_N_self_attn_q_proj`, `..._mlp_gate_proj`), which kohya loads as a Gemma2Model: the
pipeline's `text_encoder`, whose paths are `layers.N.self_attn.q_proj` (no `model.` level). A file saved with
`split_qkv` is merged back into one qkv module by kohya's `state_dict`, so it maps the same way.

The fused qkv is grouped-query attention: q is n_heads * head_dim rows, k and v n_kv_heads * head_dim each, so
its rows do not split in three equal parts. Both NextDiT and diffusers take head_dim = hidden / n_heads, so q is
exactly `hidden` rows, and `hidden` is the qkv layer's input width: q takes the first in_features rows and k, v
halve the rest. This needs nothing but the module's own shapes (Lumina-Image-2.0: [2304, 768, 768], what
diffusers' converter of the original names hard-codes; the tiny fixture: [64, 32, 32]).

NextDiT's block modulation gives (scale_msa, gate_msa, scale_mlp, gate_mlp), as diffusers' LuminaRMSNormZero
reads it, and the final layer's gives one scale, as LuminaLayerNormContinuous's linear_1 does: no rows swap.

Lumina2Pipeline.load_lora_weights loads the transformer only (its `_lora_loadable_modules` is ['transformer'];
`text_encoder.*` keys are dropped without a word), so the evaluator applies those with peft itself
(evaluation/lora_attach.py), every module with its own rank.
"""

from __future__ import annotations

import re

import torch

from lora_monitor.checkpoints.kohya_keys import QKV, Part, direct, module_parts_of, to_peft

TEXT_ENCODER_PREFIX = "lora_te_"
TEXT_ENCODER = "text_encoder"
_BLOCK = r"(layers|noise_refiner|context_refiner)_(\d+)"

# unfused modules: kohya name after `lora_unet_` -> diffusers path ({0}: block list, {1}: block index)
_DIRECT = (
    (rf"{_BLOCK}_attention_out", "{0}.{1}.attn.to_out.0"),
    (rf"{_BLOCK}_feed_forward_w1", "{0}.{1}.feed_forward.linear_1"),
    (rf"{_BLOCK}_feed_forward_w2", "{0}.{1}.feed_forward.linear_2"),
    (rf"{_BLOCK}_feed_forward_w3", "{0}.{1}.feed_forward.linear_3"),
    # the context refiner has no modulation (diffusers' norm1 there is a plain RMSNorm): not matched
    (r"(layers|noise_refiner)_(\d+)_adaLN_modulation_1", "{0}.{1}.norm1.linear"),
    (r"final_layer_adaLN_modulation_1", "norm_out.linear_1"),
    (r"final_layer_linear", "norm_out.linear_2"),
    (r"x_embedder", "x_embedder"),
    (r"t_embedder_mlp_0", "time_caption_embed.timestep_embedder.linear_1"),
    (r"t_embedder_mlp_2", "time_caption_embed.timestep_embedder.linear_2"),
    (r"cap_embedder_1", "time_caption_embed.caption_embedder.1"),
)

# Gemma2Model module names (underscored by kohya) -> dotted paths; the leaf attributes keep their own `_`
_GEMMA2 = ((r"layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
            "layers.{0}.{1}.{2}"),)


def qkv_parts(block: str, out_rows: int, in_features: int) -> list[Part] | None:
    """q, k, v of a grouped-query fused qkv: q as wide as the input (the hidden size), k and v half the rest each;
    None when the rest is not two equal parts."""
    rest = out_rows - in_features
    if rest <= 0 or rest % 2:
        return None
    kv = rest // 2
    bounds = ((0, in_features), (in_features, in_features + kv), (in_features + kv, out_rows))
    return [Part("transformer", f"{block}.attn.{n}", (b,)) for n, b in zip(QKV, bounds, strict=True)]


def transformer_parts(name: str, out_rows: int, in_features: int) -> list[Part] | None:
    """The diffusers layers of kohya NextDiT module `name` (without `lora_unet_`); None when unknown.

    `out_rows` is the module's up-matrix row count, `in_features` its down matrix's column count.
    """
    if m := re.fullmatch(rf"{_BLOCK}_attention_qkv", name):
        return qkv_parts(f"{m[1]}.{m[2]}", out_rows, in_features)
    return direct(_DIRECT, name, "transformer", out_rows)


# the diffusers layers of a kohya Lumina 2 module name (with its prefix); None when the name maps to none
module_parts = module_parts_of(transformer_parts, {TEXT_ENCODER_PREFIX: TEXT_ENCODER}, _GEMMA2)


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya Lumina 2 LoRA as peft keys (`transformer.*` for Lumina2Pipeline.load_lora_weights, `text_encoder.*`
    for the Gemma2 encoder, which that loader does not take); diffusers 0.42 maps none of kohya's names and
    applies nothing without an error."""
    return to_peft(state, module_parts)
