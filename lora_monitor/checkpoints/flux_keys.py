"""kohya's FLUX.1 LoRA names -> diffusers' FluxTransformer2DModel / CLIP-L / T5 modules, at any model width.

kohya (networks/lora_flux.py) names each LoRA module after the BFL model's Linear layers: `lora_unet_` +
the module path with `_` for `.` (`double_blocks_0_img_attn_qkv`), `lora_te1_` for CLIP-L and `lora_te3_` for
T5-XXL. BFL fuses projections diffusers keeps apart: a double block's `img_attn_qkv` / `txt_attn_qkv` is
diffusers' q, k, v (`to_q`... / `add_q_proj`...), a single block's `linear1` is q, k, v and the MLP input
(`proj_mlp`); they split as kohya_keys describes. The row counts come from the file's own shapes (a single
block's input width is its hidden size), never from FLUX.1's 3072, so tiny and pruned models convert too.

BFL's final layer computes (shift, scale) where diffusers' `norm_out` computes (scale, shift): its up rows
swap halves.
"""

from __future__ import annotations

import re

import torch

from lora_monitor.checkpoints.kohya_keys import (
    ADD_QKV,
    QKV,
    Part,
    direct,
    module_parts_of,
    qkv_and_mlp,
    split_equal,
    swapped_halves,
    to_peft,
)

TEXT_ENCODER_PREFIXES = {"lora_te1_": "text_encoder", "lora_te3_": "text_encoder_2"}  # CLIP-L, T5-XXL

# unfused modules: kohya name after `lora_unet_` -> diffusers path ({0}: block index)
_DIRECT = (
    (r"double_blocks_(\d+)_img_attn_proj", "transformer_blocks.{0}.attn.to_out.0"),
    (r"double_blocks_(\d+)_txt_attn_proj", "transformer_blocks.{0}.attn.to_add_out"),
    (r"double_blocks_(\d+)_img_mlp_0", "transformer_blocks.{0}.ff.net.0.proj"),
    (r"double_blocks_(\d+)_img_mlp_2", "transformer_blocks.{0}.ff.net.2"),
    (r"double_blocks_(\d+)_txt_mlp_0", "transformer_blocks.{0}.ff_context.net.0.proj"),
    (r"double_blocks_(\d+)_txt_mlp_2", "transformer_blocks.{0}.ff_context.net.2"),
    (r"double_blocks_(\d+)_img_mod_lin", "transformer_blocks.{0}.norm1.linear"),
    (r"double_blocks_(\d+)_txt_mod_lin", "transformer_blocks.{0}.norm1_context.linear"),
    (r"single_blocks_(\d+)_linear2", "single_transformer_blocks.{0}.proj_out"),
    (r"single_blocks_(\d+)_modulation_lin", "single_transformer_blocks.{0}.norm.linear"),
    (r"img_in", "x_embedder"),
    (r"txt_in", "context_embedder"),
    (r"time_in_in_layer", "time_text_embed.timestep_embedder.linear_1"),
    (r"time_in_out_layer", "time_text_embed.timestep_embedder.linear_2"),
    (r"vector_in_in_layer", "time_text_embed.text_embedder.linear_1"),
    (r"vector_in_out_layer", "time_text_embed.text_embedder.linear_2"),
    (r"guidance_in_in_layer", "time_text_embed.guidance_embedder.linear_1"),
    (r"guidance_in_out_layer", "time_text_embed.guidance_embedder.linear_2"),
    (r"final_layer_linear", "proj_out"),
)


def transformer_parts(name: str, out_rows: int, in_features: int) -> list[Part] | None:
    """The diffusers layers of kohya transformer module `name` (without `lora_unet_`); None when unknown.

    `out_rows` is the module's up-matrix row count, `in_features` its down matrix's column count.
    """
    if m := re.fullmatch(r"double_blocks_(\d+)_(img|txt)_attn_qkv", name):
        names = QKV if m[2] == "img" else ADD_QKV
        return split_equal("transformer", tuple(f"transformer_blocks.{m[1]}.attn.{n}" for n in names), out_rows)
    if m := re.fullmatch(r"single_blocks_(\d+)_linear1", name):  # reads the hidden state: in_features wide
        return qkv_and_mlp(f"single_transformer_blocks.{m[1]}", out_rows, in_features)
    if name == "final_layer_adaLN_modulation_1":
        return swapped_halves("transformer", "norm_out.linear", out_rows)
    return direct(_DIRECT, name, "transformer", out_rows)


# the diffusers layers of a kohya FLUX module name (with its prefix); None when the name maps to none
module_parts = module_parts_of(transformer_parts, TEXT_ENCODER_PREFIXES)


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya FLUX LoRA as peft keys for FluxPipeline.load_lora_weights (diffusers' own converter assumes
    FLUX.1's full width)."""
    return to_peft(state, module_parts)
