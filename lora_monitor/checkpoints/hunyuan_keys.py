"""kohya's HunyuanImage 2.1 LoRA names -> diffusers' HunyuanImageTransformer2DModel modules, at any model width.

kohya (networks/lora_hunyuan_image.py) puts a LoRA on every Linear inside the DiT's MMDoubleStreamBlock and
MMSingleStreamBlock (library/hunyuan_image_modules.py) and nowhere else: no embedder, token refiner or final layer,
and no text encoder (its network keeps no text-encoder modules). The names are `lora_unet_` + the Linear's path with
`_` for `.`:

- double block `double_blocks_N_`: `img_attn_qkv` / `txt_attn_qkv` (fused q, k, v), `img_attn_proj` /
  `txt_attn_proj`, `img_mlp_fc1` / `img_mlp_fc2` (and `txt_`), `img_mod_linear` / `txt_mod_linear`;
- single block `single_blocks_N_`: `linear1` (fused q, k, v and the MLP input), `linear2` (output of the
  concatenated attention and MLP), `modulation_linear`.

diffusers keeps every fused projection apart, and no diffusers layer fuses what kohya splits, so each kohya module
maps exactly: a fused layer's up rows are cut into its parts (kohya_keys). The cuts come from the module's own
shapes, never from HunyuanImage 2.1's hidden size 3584: a double block's qkv is three equal parts; a single block's
`linear1` reads the hidden state, so its input width is the hidden size, q, k and v take that many rows each and the
MLP input (mlp_ratio * hidden) the rest. A file saved with `split_qkv` is merged back by kohya's `state_dict` into
one module with a block-diagonal up matrix, so it maps the same way.

Modulations need no swap: kohya's double-block `ModulateDiT` (factor 6) gives (shift, scale, gate) for attention
then for the MLP, the order diffusers' AdaLayerNormZero chunks it; the single block's (factor 3) gives (shift,
scale, gate), as AdaLayerNormZeroSingle reads it. (Only the original final layer's (shift, scale) is reversed in
diffusers' norm_out, and kohya puts no LoRA there.) diffusers' own converter of the original weights
(scripts/convert_hunyuan_image_to_diffusers.py) maps the same names the same way.
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
    to_peft,
)

# unfused modules: kohya name after `lora_unet_` -> diffusers path ({0}: block index)
_DIRECT = (
    (r"double_blocks_(\d+)_img_attn_proj", "transformer_blocks.{0}.attn.to_out.0"),
    (r"double_blocks_(\d+)_txt_attn_proj", "transformer_blocks.{0}.attn.to_add_out"),
    (r"double_blocks_(\d+)_img_mlp_fc1", "transformer_blocks.{0}.ff.net.0.proj"),
    (r"double_blocks_(\d+)_img_mlp_fc2", "transformer_blocks.{0}.ff.net.2"),
    (r"double_blocks_(\d+)_txt_mlp_fc1", "transformer_blocks.{0}.ff_context.net.0.proj"),
    (r"double_blocks_(\d+)_txt_mlp_fc2", "transformer_blocks.{0}.ff_context.net.2"),
    (r"double_blocks_(\d+)_img_mod_linear", "transformer_blocks.{0}.norm1.linear"),
    (r"double_blocks_(\d+)_txt_mod_linear", "transformer_blocks.{0}.norm1_context.linear"),
    (r"single_blocks_(\d+)_linear2", "single_transformer_blocks.{0}.proj_out"),
    (r"single_blocks_(\d+)_modulation_linear", "single_transformer_blocks.{0}.norm.linear"),
)


def transformer_parts(name: str, out_rows: int, in_features: int) -> list[Part] | None:
    """The diffusers layers of kohya DiT module `name` (without `lora_unet_`); None when unknown or when the
    fused rows cannot be cut as the layout says.

    `out_rows` is the module's up-matrix row count, `in_features` its down matrix's column count.
    """
    if m := re.fullmatch(r"double_blocks_(\d+)_(img|txt)_attn_qkv", name):
        names = QKV if m[2] == "img" else ADD_QKV
        return split_equal("transformer", tuple(f"transformer_blocks.{m[1]}.attn.{n}" for n in names), out_rows)
    if m := re.fullmatch(r"single_blocks_(\d+)_linear1", name):  # reads the hidden state: in_features wide
        return qkv_and_mlp(f"single_transformer_blocks.{m[1]}", out_rows, in_features)
    return direct(_DIRECT, name, "transformer", out_rows)


# the diffusers layers of a kohya HunyuanImage module name (with its prefix); kohya trains no text encoder for
# this family, so a `lora_te` name is foreign: None, and reported
module_parts = module_parts_of(transformer_parts, {})


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya HunyuanImage LoRA as peft keys (`transformer.<path>.lora_A.weight` ...) for the transformer's
    load_lora_adapter (HunyuanImagePipeline has no load_lora_weights in diffusers 0.42, and the transformer's
    loader fails on kohya's names with an IndexError)."""
    return to_peft(state, module_parts)
