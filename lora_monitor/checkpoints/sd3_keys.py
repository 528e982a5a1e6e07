"""kohya's SD3.x LoRA names -> diffusers' SD3Transformer2DModel / CLIP-L / CLIP-G / T5 modules, at any width.

kohya (networks/lora_sd3.py) names each module after SD3's reference MMDiT (library/sd3_models.py): a joint
block's `x_block` (image stream) and `context_block` (text stream), each with a fused `attn_qkv`, `attn_proj`,
`mlp_fc1`/`mlp_fc2` and `adaLN_modulation_1`; SD3.5-medium's image stream adds a second attention (`attn2_*`).
With `emb_dims` the embedders and the final layer are trained too. `lora_te1_`/`lora_te2_`/`lora_te3_` are
CLIP-L, CLIP-G and T5-XXL. A file saved with `split_qkv` is merged back into one qkv module by kohya's
`state_dict`, so it maps the same way.

The last joint block's text stream is "pre-only" (no projection or MLP after attention): its modulation gives
(shift, scale) where diffusers' `norm1_context` (AdaLayerNormContinuous) reads (scale, shift), so its up rows
swap halves, as the final layer's do. That block is known from the file itself: it is the only context block
whose modulation has 2 rather than 6 outputs per hidden unit (the hidden size is the layer's input width).
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
    split_equal,
    swapped_halves,
    to_peft,
)

TEXT_ENCODER_PREFIXES = {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te3_": "text_encoder_3"}
_QKV = {"x_block_attn": QKV, "x_block_attn2": QKV, "context_block_attn": ADD_QKV}
_ATTN_MODULE = {"x_block_attn": "attn", "x_block_attn2": "attn2", "context_block_attn": "attn"}

# unfused modules: kohya name after `lora_unet_` -> diffusers path ({0}: block index)
_DIRECT = (
    (r"joint_blocks_(\d+)_x_block_attn_proj", "transformer_blocks.{0}.attn.to_out.0"),
    (r"joint_blocks_(\d+)_x_block_attn2_proj", "transformer_blocks.{0}.attn2.to_out.0"),
    (r"joint_blocks_(\d+)_context_block_attn_proj", "transformer_blocks.{0}.attn.to_add_out"),
    (r"joint_blocks_(\d+)_x_block_mlp_fc1", "transformer_blocks.{0}.ff.net.0.proj"),
    (r"joint_blocks_(\d+)_x_block_mlp_fc2", "transformer_blocks.{0}.ff.net.2"),
    (r"joint_blocks_(\d+)_context_block_mlp_fc1", "transformer_blocks.{0}.ff_context.net.0.proj"),
    (r"joint_blocks_(\d+)_context_block_mlp_fc2", "transformer_blocks.{0}.ff_context.net.2"),
    (r"joint_blocks_(\d+)_x_block_adaLN_modulation_1", "transformer_blocks.{0}.norm1.linear"),
    (r"context_embedder", "context_embedder"),
    (r"t_embedder_mlp_0", "time_text_embed.timestep_embedder.linear_1"),
    (r"t_embedder_mlp_2", "time_text_embed.timestep_embedder.linear_2"),
    (r"y_embedder_mlp_0", "time_text_embed.text_embedder.linear_1"),
    (r"y_embedder_mlp_2", "time_text_embed.text_embedder.linear_2"),
    (r"x_embedder_proj", "pos_embed.proj"),  # a conv (the patch embedding), as in diffusers
    (r"final_layer_linear", "proj_out"),
)


def transformer_parts(name: str, out_rows: int, in_features: int) -> list[Part] | None:
    """The diffusers layers of kohya MMDiT module `name` (without `lora_unet_`); None when unknown.

    `out_rows` is the module's up-matrix row count, `in_features` its down matrix's column count.
    """
    if m := re.fullmatch(r"joint_blocks_(\d+)_(x_block_attn2?|context_block_attn)_qkv", name):
        attn = f"transformer_blocks.{m[1]}.{_ATTN_MODULE[m[2]]}"
        return split_equal("transformer", tuple(f"{attn}.{n}" for n in _QKV[m[2]]), out_rows)
    if m := re.fullmatch(r"joint_blocks_(\d+)_context_block_adaLN_modulation_1", name):
        path = f"transformer_blocks.{m[1]}.norm1_context.linear"
        if out_rows == 2 * in_features:  # the pre-only last block: (shift, scale)
            return swapped_halves("transformer", path, out_rows)
        return [Part("transformer", path, ((0, out_rows),))]
    if name == "final_layer_adaLN_modulation_1":
        return swapped_halves("transformer", "norm_out.linear", out_rows)
    return direct(_DIRECT, name, "transformer", out_rows)


# the diffusers layers of a kohya SD3 module name (with its prefix); None when the name maps to none
module_parts = module_parts_of(transformer_parts, TEXT_ENCODER_PREFIXES)


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya SD3 LoRA as peft keys for StableDiffusion3Pipeline.load_lora_weights (diffusers 0.42 maps none of
    kohya's SD3 names and applies nothing without an error)."""
    return to_peft(state, module_parts)
