"""kohya's FLUX.1 LoRA names -> diffusers' FluxTransformer2DModel / CLIP-L / T5 modules, at any model width.

kohya (networks/lora_flux.py) names each LoRA module after the BFL model's Linear layers: `lora_unet_` +
the module path with `_` for `.` (`double_blocks_0_img_attn_qkv`), `lora_te1_` for CLIP-L and `lora_te3_` for
T5-XXL. BFL fuses projections diffusers keeps apart: a double block's `img_attn_qkv` / `txt_attn_qkv` is
diffusers' q, k, v (`to_q`... / `add_q_proj`...), a single block's `linear1` is q, k, v and the MLP input
(`proj_mlp`). A fused LoRA splits exactly: the delta B @ A of the fused layer, cut by rows, is the delta of
each part, so every part keeps the whole down matrix A and takes its rows of the up matrix B. The row counts
come from the file's own shapes (a single block's input width is its hidden size), never from FLUX.1's 3072,
so tiny and pruned models convert too. kohya's LoRA scale alpha / rank is folded into B, as for the other
layouts (formats.py): diffusers then loads the result with scale 1.

BFL's final layer computes (shift, scale) where diffusers' `norm_out` computes (scale, shift): its up rows
swap halves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

TRANSFORMER_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIXES = {"lora_te1_": "text_encoder", "lora_te3_": "text_encoder_2"}  # CLIP-L, T5-XXL
_QKV = ("to_q", "to_k", "to_v")
_ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

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
# text encoder module names (underscored by kohya) -> dotted paths; the leaf attributes keep their own `_`
_TEXT_ENCODER = (
    (r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
     "text_model.encoder.layers.{0}.{1}.{2}"),
    (r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)",
     "encoder.block.{0}.layer.{1}.{2}.{3}"),
)


@dataclass(frozen=True)
class Part:
    """One diffusers layer a kohya module lands in: its component, module path and rows of the up matrix."""

    component: str
    path: str
    rows: tuple[tuple[int, int], ...]  # (start, stop) row ranges of the kohya up matrix, concatenated


def is_kohya_flux(keys: list[str]) -> bool:
    return any(re.match(r"lora_unet_(double|single)_blocks_\d+_", k) for k in keys)


def transformer_parts(name: str, out_rows: int, in_features: int) -> list[Part] | None:
    """The diffusers layers of kohya transformer module `name` (without `lora_unet_`); None when unknown.

    `out_rows` is the module's up-matrix row count, `in_features` its down matrix's column count.
    """
    if m := re.fullmatch(r"double_blocks_(\d+)_(img|txt)_attn_qkv", name):
        if out_rows % 3:
            return None
        width, names = out_rows // 3, _QKV if m[2] == "img" else _ADD_QKV
        return [Part("transformer", f"transformer_blocks.{m[1]}.attn.{n}", ((i * width, (i + 1) * width),))
                for i, n in enumerate(names)]
    if m := re.fullmatch(r"single_blocks_(\d+)_linear1", name):
        hidden = in_features  # linear1 reads the hidden state: q, k and v are each that wide, the MLP the rest
        if out_rows <= 3 * hidden:
            return None
        parts = [Part("transformer", f"single_transformer_blocks.{m[1]}.attn.{n}", ((i * hidden, (i + 1) * hidden),))
                 for i, n in enumerate(_QKV)]
        return [*parts, Part("transformer", f"single_transformer_blocks.{m[1]}.proj_mlp", ((3 * hidden, out_rows),))]
    if name == "final_layer_adaLN_modulation_1" and out_rows % 2 == 0:
        half = out_rows // 2
        return [Part("transformer", "norm_out.linear", ((half, out_rows), (0, half)))]
    for pattern, path in _DIRECT:
        if m := re.fullmatch(pattern, name):
            return [Part("transformer", path.format(*m.groups()), ((0, out_rows),))]
    return None


def text_encoder_part(key_prefix: str, name: str, out_rows: int) -> Part | None:
    component = TEXT_ENCODER_PREFIXES[key_prefix]
    for pattern, path in _TEXT_ENCODER:
        if m := re.fullmatch(pattern, name):
            return Part(component, path.format(*m.groups()), ((0, out_rows),))
    return None


def module_parts(module: str, down: torch.Tensor, up: torch.Tensor) -> list[Part] | None:
    """The diffusers layers of a kohya FLUX module name (with its prefix); None when the name maps to none."""
    if module.startswith(TRANSFORMER_PREFIX):
        return transformer_parts(module[len(TRANSFORMER_PREFIX):], up.shape[0], down.shape[1])
    for prefix in TEXT_ENCODER_PREFIXES:
        if module.startswith(prefix):
            part = text_encoder_part(prefix, module[len(prefix):], up.shape[0])
            return [part] if part else None
    return None


def kohya_modules(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """kohya module name -> (down, up, scale alpha/rank); a module without alpha has scale 1 (alpha = rank)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, down in state.items():
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            up = state[f"{name}.lora_up.weight"]
            alpha = state.get(f"{name}.alpha")
            rank = down.shape[0]
            out[name] = (down, up, float(alpha.item()) / rank if alpha is not None else 1.0)
    return out


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya FLUX LoRA as peft keys (`transformer.<path>.lora_A.weight` ...) for FluxPipeline.load_lora_weights.

    Modules whose name maps to no diffusers layer are left out; the caller's check of what was applied names them.
    """
    out: dict[str, torch.Tensor] = {}
    for name, (down, up, scale) in kohya_modules(state).items():
        if down.ndim != 2 or up.ndim != 2:
            continue  # FLUX has no conv layers; such a module stays unapplied and is reported
        for part in module_parts(name, down, up) or []:
            rows = torch.cat([up[start:stop] for start, stop in part.rows])
            b = rows if scale == 1.0 else (rows.float() * scale).to(up.dtype)
            out[f"{part.component}.{part.path}.lora_A.weight"] = down.contiguous()
            out[f"{part.component}.{part.path}.lora_B.weight"] = b.contiguous()
    return out
