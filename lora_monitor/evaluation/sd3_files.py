"""A diffusers StableDiffusion3Pipeline from a diffusers folder, or assembled from the files kohya trains SD3 with.

kohya's sd3_train_network.py (library/sd3_utils.py) reads `--pretrained_model_name_or_path` in Stability's
single-file layout: the MMDiT under `model.diffusion_model.`, the VAE under `first_stage_model.` and, in the
"incl_clips" files, the text encoders under `text_encoders.{clip_l,clip_g,t5xxl}.transformer.`. `--clip_l`,
`--clip_g` and `--t5xxl` are transformers state dicts (CLIPTextModelWithProjection, T5EncoderModel), `--vae` an
LDM-layout VAE; tokenizers come from the hub or kohya's `--tokenizer_cache_dir`. All three text encoders are
needed (kohya calls `.eval()` on each, so it stops without T5 as well). A separate file is used whenever it is
given, the checkpoint's own model otherwise: kohya does so for CLIP-L, and prefers the checkpoint's CLIP-G / T5
over --clip_g / --t5xxl, but strips only `text_encoders.<name>.` there, so Stability's `.transformer.` names never
fit its models and such a run cannot have trained on them. Each model's size is read from its tensors' shapes, so
tiny or pruned models load; the big ones are built on the meta device first.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lora_monitor.errors import UserError
from lora_monitor.evaluation.flux_files import (
    count_matching,
    kohya_tokenizer,
    ldm_vae,
    on_meta,
    read_safetensors,
    t5_from_state,
)

log = logging.getLogger(__name__)

# kohya's strategy_sd3 tokenizer ids (saved as <tokenizer_cache_dir>/<id with _ for />)
TOKENIZERS = {"clip_l": "openai/clip-vit-large-patch14", "clip_g": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
              "t5xxl": "google/t5-v1_1-xxl"}
VAE_SCALING, VAE_SHIFT = 1.5305, 0.0609  # SD3's VAE scale / shift factors (kohya's sd3_models.VAE_SCALE_FACTOR)
SCHEDULER_SHIFT = 3.0  # SD3's FlowMatchEulerDiscreteScheduler shift (scheduler_config.json of SD3 / SD3.5)
HEAD_DIM = 64  # MMDiT's attention heads are 64 wide: kohya builds num_heads = depth = hidden // 64
MMDIT_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
ENCODERS = {  # kohya's part -> (name, pipeline slot, key that tells it is one, CLIP activation)
    "clip_l": ("CLIP-L", "text_encoder", "text_model.embeddings.token_embedding.weight", "quick_gelu"),
    "clip_g": ("CLIP-G", "text_encoder_2", "text_model.embeddings.token_embedding.weight", "gelu"),
    "t5xxl": ("T5-XXL", "text_encoder_3", "shared.weight", None),
}
KOHYA_PARTS = (*ENCODERS, "vae")


def load_sd3(base_model: str, parts: Mapping[str, str], dtype: torch.dtype) -> Any:
    """StableDiffusion3Pipeline from a diffusers folder / hub id, or from kohya's checkpoint file plus `parts`
    (clip_l, clip_g, t5xxl, vae, tokenizer_cache_dir), each separate file used instead of the checkpoint's own."""
    import diffusers

    path = Path(base_model)
    if not path.is_file():
        return diffusers.StableDiffusion3Pipeline.from_pretrained(base_model, dtype=dtype)
    for name in KOHYA_PARTS:
        if parts.get(name) and not Path(parts[name]).is_file():
            raise UserError(f"kohya's --{name} file {parts[name]} does not exist; check the path")
    state = read_safetensors(path)
    mmdit = mmdit_state(state, path)
    inside = {name: _embedded(state, name) for name in ENCODERS}
    inside["vae"] = {k.removeprefix(VAE_PREFIX): v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    missing = [f"--{name}" for name in KOHYA_PARTS if not parts.get(name) and not inside[name]]
    if missing:
        raise UserError(f"base model {base_model} does not contain every SD3 model: kohya's {', '.join(missing)} "
                        "must be given too (in [kohya.args] or its config_file), or set [eval] base_model to a "
                        "diffusers SD3 folder")
    sources = {name: Path(parts[name]) if parts.get(name) else path for name in KOHYA_PARTS}
    log.info("SD3 pipeline from %s: %s", path.name,
             ", ".join(f"{name} {'from ' + p.name if p != path else 'inside'}" for name, p in sources.items()))
    models = {slot: _encoder(name, parts, inside[name], sources[name], dtype)
              for name, (_, slot, _, _) in ENCODERS.items()}
    vae_state = read_safetensors(sources["vae"]) if parts.get("vae") else inside["vae"]
    cache = parts.get("tokenizer_cache_dir")
    return diffusers.StableDiffusion3Pipeline(
        transformer=load_transformer(mmdit, path, dtype),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        vae=ldm_vae(vae_state, dtype, sources["vae"], "an SD3 VAE (kohya's --vae)", VAE_SCALING, VAE_SHIFT),
        tokenizer=kohya_tokenizer("CLIPTokenizer", TOKENIZERS["clip_l"], cache),
        tokenizer_2=kohya_tokenizer("CLIPTokenizer", TOKENIZERS["clip_g"], cache),
        tokenizer_3=kohya_tokenizer("T5TokenizerFast", TOKENIZERS["t5xxl"], cache),
        **models,
    )


def _embedded(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The checkpoint's own text encoder `name` in transformers' names (Stability nests it under `.transformer.`)."""
    prefix = f"text_encoders.{name}."
    return {k.removeprefix(prefix).removeprefix("transformer."): v for k, v in state.items() if k.startswith(prefix)}


def _encoder(name: str, parts: Mapping[str, str], inside: dict[str, torch.Tensor], where: Path,
             dtype: torch.dtype) -> Any:
    state = read_safetensors(where) if parts.get(name) else inside
    label, _, marker, act = ENCODERS[name]
    if marker not in state:
        raise UserError(f"{where}: no {label} text encoder (kohya's --{name}) in it: no {marker} tensor")
    if act is None:
        return t5_from_state(state, dtype, where)
    return clip_from_state(state, dtype, where, label, act)


# ---------------------------------------------------------------------------------------------- transformer
def transformer_config(state: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """SD3Transformer2DModel's config from the MMDiT's tensor shapes (Stability's names, no prefix), as kohya's
    sd3_utils.analyze_state_dict_state reads them."""
    keys = list(state)
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    if hidden % HEAD_DIM:
        raise UserError(f"{where}: MMDiT width {hidden} is not a multiple of SD3's {HEAD_DIM}-wide attention heads")
    positions = int(state["pos_embed"].shape[1])
    side = math.isqrt(positions)
    if side * side != positions:
        raise UserError(f"{where}: pos_embed holds {positions} positions, not a square grid")
    context_out, context_in = state["context_embedder.weight"].shape
    return {
        "sample_size": min(128, side),  # the pipeline's default latent size: SD3's 128 (1024 px) where it fits
        "patch_size": int(patch),
        "in_channels": int(in_channels),
        "out_channels": int(state["final_layer.linear.weight"].shape[0]) // int(patch) ** 2,
        "num_layers": count_matching(keys, r"joint_blocks\.(\d+)\."),
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": int(hidden) // HEAD_DIM,
        "joint_attention_dim": int(context_in),
        "caption_projection_dim": int(context_out),
        "pooled_projection_dim": int(state["y_embedder.mlp.0.weight"].shape[1]),
        "pos_embed_max_size": side,
        "dual_attention_layers": tuple(sorted({int(m[1]) for k in keys
                                               if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))})),
        "qk_norm": "rms_norm" if "joint_blocks.0.x_block.attn.ln_q.weight" in state else None,
    }


def mmdit_state(checkpoint: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The MMDiT's tensors of a checkpoint in Stability's layout, which kohya's load_mmdit reads, without prefix."""
    state = {k.removeprefix(MMDIT_PREFIX): v for k, v in checkpoint.items() if k.startswith(MMDIT_PREFIX)}
    if "x_embedder.proj.weight" not in state or "pos_embed" not in state:
        if "pos_embed.proj.weight" in checkpoint or "transformer_blocks.0.attn.to_q.weight" in checkpoint:
            raise UserError(f"{where}: an SD3 transformer in diffusers' layout; set [eval] base_model to the "
                            "diffusers folder it belongs to")
        raise UserError(f"{where}: not an SD3 checkpoint in Stability's layout (no model.diffusion_model."
                        "x_embedder / pos_embed tensors), which kohya's --pretrained_model_name_or_path needs")
    return state


def load_transformer(state: dict[str, torch.Tensor], where: Path, dtype: torch.dtype) -> Any:
    """SD3Transformer2DModel from the MMDiT's tensors in Stability's names (mmdit_state)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = dict(state)  # the converter pops what it converts
    config = transformer_config(state, where)
    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(state)
    except KeyError as exc:
        raise UserError(f"{where}: SD3 MMDiT tensor {exc} is missing; the file is incomplete") from None
    if state:  # kohya loads the MMDiT with strict=False: tensors it has no use for are left out here too
        log.warning("%s: %d MMDiT tensors not used, e.g. %s", where, len(state), ", ".join(sorted(state)[:3]))
    return on_meta(SD3Transformer2DModel, converted, dtype, where, **config)


# ---------------------------------------------------------------------------------------------- CLIP
def clip_from_state(state: dict[str, torch.Tensor], dtype: torch.dtype, where: Path, label: str, act: str) -> Any:
    """CLIPTextModelWithProjection (SD3's CLIP-L / CLIP-G) sized from its shapes, heads 64 wide as both have;
    a CLIP-L without text_projection gets the identity, as kohya gives it."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    vocab, hidden = state["text_model.embeddings.token_embedding.weight"].shape
    if "text_projection.weight" not in state and label == "CLIP-L":
        state["text_projection.weight"] = torch.eye(int(hidden))
    positions = int(state["text_model.embeddings.position_embedding.weight"].shape[0])
    config = CLIPTextConfig(
        vocab_size=int(vocab), hidden_size=int(hidden), num_attention_heads=max(1, int(hidden) // HEAD_DIM),
        intermediate_size=int(state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=count_matching(list(state), r"text_model\.encoder\.layers\.(\d+)\."),
        max_position_embeddings=positions, hidden_act=act,
        projection_dim=int(state["text_projection.weight"].shape[0]) if "text_projection.weight" in state else 0,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # kohya's configs: eos 2 pools at the highest token id
    )
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(config)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        shown = (missing or unexpected)[:3]
        raise UserError(f"{where}: does not fit a {label} text encoder ({len(missing)} missing, {len(unexpected)} "
                        f"unexpected tensors, e.g. {', '.join(shown)})")
    # the position ids are a computed (not stored) buffer, still on the meta device
    model.text_model.embeddings.register_buffer("position_ids", torch.arange(positions).expand((1, -1)),
                                                persistent=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{where}: no weights for {', '.join(left[:3])} of its {label} text encoder")
    return model.eval()
