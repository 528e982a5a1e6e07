"""A diffusers HunyuanImagePipeline from a diffusers folder, or assembled from the files kohya trains HunyuanImage 2.1
with.

kohya's hunyuan_image_train_network.py takes the model in pieces: `--pretrained_model_name_or_path` the DiT in
Tencent's original layout (library/hunyuan_image_models.py: fused `img_attn_qkv` / `txt_attn_qkv` / `linear1`,
`byt5_in`, `txt_in` token refiner, `final_layer`; non-distilled only, loaded strictly), `--text_encoder` Qwen2.5-VL
(library/hunyuan_image_text_encoder.py: transformers' older names `model.*` / `visual.*` / `lm_head.*`, which kohya
moves under `model.language_model.` / `model.visual.`), `--byt5` the glyph ByT5 encoder (`shared.weight` +
`encoder.*`, a T5 encoder whose embedding kohya grows by its colour and font tokens) and `--vae` the 32x VAE
(library/hunyuan_image_vae.py: LDM-like names, `encoder.down.N.block.M`, `mid.attn_1`, ...). Tokenizers come from
kohya's hub ids (Qwen/Qwen2.5-VL-7B-Instruct, google/byt5-small) or `--tokenizer_cache_dir`.

diffusers 0.42 has no single-file converter for this family (its scripts/convert_hunyuan_image_to_diffusers.py is
not importable), so the DiT and VAE names are mapped here; the DiT's fused layers are cut by the same rules as the
LoRA modules' (hunyuan_keys.transformer_parts). Every size is read from the tensors' shapes, so tiny or pruned
models load, the big models built on the meta device first. What shapes cannot tell is Qwen2.5-VL-7B's: heads 128
wide (one key/value head's width where that is narrower), RMS eps 1e-6, rope theta 1e6.

The scheduler and guiders take kohya's sampler values for HunyuanImage 2.1 (flow shift 5.0, CFG 3.5, adaptive
projected guidance from step 5, and from step 38 for prompts with quoted text): the run's own sample images were
made with them, and diffusers' conversion script does not say what its published folder's guider configs hold.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights

from lora_monitor.checkpoints import hunyuan_keys
from lora_monitor.checkpoints.kohya_keys import QKV
from lora_monitor.errors import UserError
from lora_monitor.evaluation.flux_files import (
    count_matching,
    kohya_tokenizer,
    on_meta,
    read_safetensors,
    require_parts,
    t5_from_state,
)

QWEN_TOKENIZER = "Qwen/Qwen2.5-VL-7B-Instruct"  # kohya's hunyuan_image_text_encoder.QWEN_2_5_VL_IMAGE_ID
BYT5_TOKENIZER = "google/byt5-small"  # kohya's BYT5_TOKENIZER_PATH
KOHYA_PARTS = ("text_encoder", "byt5", "vae")
FLOW_SHIFT, GUIDANCE, APG_START, APG_START_OCR = 5.0, 3.5, 5, 38  # kohya's HunyuanImage 2.1 sampler
VAE_SCALING = 0.75289  # kohya's hunyuan_image_vae.LATENT_SCALING_FACTOR (the diffusers VAE config's too)
VAE_SAMPLE_SIZE = 384  # HunyuanImage 2.1's VAE config: its tiling tile size in pixels
QWEN_HEAD_DIM, QWEN_RMS_EPS, QWEN_ROPE_THETA = 128, 1e-6, 1e6  # Qwen2.5-VL-7B's config (kohya's hard-coded one)
QWEN_SPECIAL_IDS = {"bos_token_id": 151643, "eos_token_id": 151645}
QWEN_VISION_HEAD_DIM = 80  # its vision tower's 1280 / 16 heads (the pipeline never runs the tower)

# Tencent's DiT names -> diffusers' HunyuanImageTransformer2DModel, outside the double/single blocks
_REFINER = r"txt_in\.individual_token_refiner\.blocks\.(\d+)\."
_NAMES = (
    (r"byt5_in\.layernorm\.", "context_embedder_2.norm."),
    (r"byt5_in\.fc(\d)\.", "context_embedder_2.linear_{0}."),
    (r"img_in\.proj\.", "x_embedder.proj."),
    (r"txt_in\.input_embedder\.", "context_embedder.proj_in."),
    (r"txt_in\.t_embedder\.mlp\.0\.", "context_embedder.time_text_embed.timestep_embedder.linear_1."),
    (r"txt_in\.t_embedder\.mlp\.2\.", "context_embedder.time_text_embed.timestep_embedder.linear_2."),
    (r"txt_in\.c_embedder\.linear_(\d)\.", "context_embedder.time_text_embed.text_embedder.linear_{0}."),
    (_REFINER + r"(norm1|norm2)\.", "context_embedder.token_refiner.refiner_blocks.{0}.{1}."),
    (_REFINER + r"self_attn_proj\.", "context_embedder.token_refiner.refiner_blocks.{0}.attn.to_out.0."),
    (_REFINER + r"mlp\.fc1\.", "context_embedder.token_refiner.refiner_blocks.{0}.ff.net.0.proj."),
    (_REFINER + r"mlp\.fc2\.", "context_embedder.token_refiner.refiner_blocks.{0}.ff.net.2."),
    (_REFINER + r"adaLN_modulation\.1\.", "context_embedder.token_refiner.refiner_blocks.{0}.norm_out.linear."),
    (r"time_in\.mlp\.0\.", "time_guidance_embed.timestep_embedder.linear_1."),
    (r"time_in\.mlp\.2\.", "time_guidance_embed.timestep_embedder.linear_2."),
    (r"final_layer\.linear\.", "proj_out."),
    (r"double_blocks\.(\d+)\.img_attn_q_norm\.", "transformer_blocks.{0}.attn.norm_q."),
    (r"double_blocks\.(\d+)\.img_attn_k_norm\.", "transformer_blocks.{0}.attn.norm_k."),
    (r"double_blocks\.(\d+)\.txt_attn_q_norm\.", "transformer_blocks.{0}.attn.norm_added_q."),
    (r"double_blocks\.(\d+)\.txt_attn_k_norm\.", "transformer_blocks.{0}.attn.norm_added_k."),
    (r"single_blocks\.(\d+)\.q_norm\.", "single_transformer_blocks.{0}.attn.norm_q."),
    (r"single_blocks\.(\d+)\.k_norm\.", "single_transformer_blocks.{0}.attn.norm_k."),
)


def load_hunyuan(base_model: str, parts: Mapping[str, str], dtype: torch.dtype) -> Any:
    """HunyuanImagePipeline from a diffusers folder / hub id, or from kohya's DiT file plus `parts` (text_encoder,
    byt5, vae, and optionally tokenizer_cache_dir)."""
    import diffusers

    path = Path(base_model)
    if not path.is_file():
        return diffusers.HunyuanImagePipeline.from_pretrained(base_model, dtype=dtype)
    require_parts(base_model, parts, KOHYA_PARTS, "a HunyuanImage DiT file", "HunyuanImage 2.1")
    cache = parts.get("tokenizer_cache_dir")
    return diffusers.HunyuanImagePipeline(
        transformer=load_transformer(path, dtype),
        vae=load_vae(Path(parts["vae"]), dtype),
        text_encoder=load_qwen(Path(parts["text_encoder"]), dtype),
        tokenizer=kohya_tokenizer("Qwen2Tokenizer", QWEN_TOKENIZER, cache),
        text_encoder_2=load_byt5(Path(parts["byt5"]), dtype),
        tokenizer_2=byt5_tokenizer(cache),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT),
        guider=diffusers.AdaptiveProjectedMixGuidance(guidance_scale=GUIDANCE,
                                                      adaptive_projected_guidance_start_step=APG_START),
        ocr_guider=diffusers.AdaptiveProjectedMixGuidance(guidance_scale=GUIDANCE,
                                                          adaptive_projected_guidance_start_step=APG_START_OCR),
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, also under the `.sft` extension that kohya's --text_encoder / --byt5 help names."""
    if path.suffix != ".sft":
        return read_safetensors(path)
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise UserError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


# ---------------------------------------------------------------------------------------------- transformer
def original_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tencent's HunyuanImage 2.1 DiT weights as diffusers names them, fused layers split by rows at any width."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if re.match(r"(double|single)_blocks\.\d+\.", key) and not module.endswith("_norm"):
            weight = state[f"{module}.weight"]
            split = hunyuan_keys.transformer_parts(module.replace(".", "_"), weight.shape[0], weight.shape[-1])
            if split is None:
                raise UserError(f"HunyuanImage DiT tensor {key} has no diffusers counterpart")
            for part in split:
                out[f"{part.path}.{leaf}"] = part.take(tensor)
        elif m := re.fullmatch(_REFINER + r"self_attn_qkv\.(weight|bias)", key):
            for name, chunk in zip(QKV, tensor.chunk(3), strict=True):
                out[f"context_embedder.token_refiner.refiner_blocks.{m[1]}.attn.{name}.{m[2]}"] = chunk
        elif key.startswith("final_layer.adaLN_modulation.1."):  # (shift, scale) -> diffusers' (scale, shift)
            shift, scale = tensor.chunk(2)
            out[f"norm_out.linear.{leaf}"] = torch.cat([scale, shift])
        else:
            out[_rename(key)] = tensor
    return out


def _rename(key: str) -> str:
    for pattern, target in _NAMES:
        if m := re.match(pattern, key):
            return target.format(*m.groups()) + key[m.end():]
    raise UserError(f"HunyuanImage DiT tensor {key} has no diffusers counterpart")


def transformer_config(state: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """HunyuanImageTransformer2DModel's config from the original tensors' shapes (2.1: hidden 3584, 28 heads of
    128, 20 double + 40 single blocks, 2 refiner blocks, text widths 3584 and 1472)."""
    keys = list(state)
    hidden, in_channels, *patch = state["img_in.proj.weight"].shape
    head_dim = int(state["double_blocks.0.img_attn_q_norm.weight"].shape[0])
    byt5 = state.get("byt5_in.fc1.weight")
    return {
        "in_channels": int(in_channels),
        "out_channels": int(state["final_layer.linear.weight"].shape[0]) // (int(patch[0]) * int(patch[1])),
        "num_attention_heads": int(hidden) // head_dim,
        "attention_head_dim": head_dim,
        "num_layers": count_matching(keys, r"double_blocks\.(\d+)\."),
        "num_single_layers": count_matching(keys, r"single_blocks\.(\d+)\."),
        "num_refiner_layers": count_matching(keys, _REFINER),
        "mlp_ratio": int(state["double_blocks.0.img_mlp.fc1.weight"].shape[0]) / int(hidden),
        "patch_size": tuple(int(p) for p in patch),
        "qk_norm": "rms_norm",
        "guidance_embeds": False,
        "text_embed_dim": int(state["txt_in.input_embedder.weight"].shape[1]),
        "text_embed_2_dim": int(byt5.shape[1]) if byt5 is not None else None,
        "rope_theta": 256.0,  # kohya's HYImageDiffusionTransformer.rope_theta
        "rope_axes_dim": (head_dim // 2, head_dim // 2),  # 2-D rope over the whole head: 2.1's (64, 64)
    }


def load_transformer(path: Path, dtype: torch.dtype) -> Any:
    from diffusers import HunyuanImageTransformer2DModel

    state = read_weights(path)
    if "x_embedder.proj.weight" in state or "transformer_blocks.0.attn.to_q.weight" in state:
        raise UserError(f"{path}: a HunyuanImage transformer in diffusers' layout; set [eval] base_model to the "
                        "diffusers folder it belongs to")
    if "img_in.proj.weight" not in state or "double_blocks.0.img_attn_q_norm.weight" not in state:
        raise UserError(f"{path}: not a HunyuanImage 2.1 DiT in Tencent's layout (no img_in / double_blocks "
                        "tensors), which kohya's --pretrained_model_name_or_path needs")
    if "guidance_in.mlp.0.weight" in state or "time_r_in.mlp.0.weight" in state:
        raise UserError(f"{path}: the distilled HunyuanImage 2.1 DiT; kohya's hunyuan_image_train_network.py trains "
                        "on the non-distilled one (hunyuanimage2.1.safetensors)")
    config = transformer_config(state, path)
    return on_meta(HunyuanImageTransformer2DModel, original_to_diffusers(state), dtype, path, **config)


# ---------------------------------------------------------------------------------------------- VAE
def vae_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya's (Tencent's) VAE names -> AutoencoderKLHunyuanImage's: each level's resnets and its resampler are one
    flat list in diffusers (encoder.down_blocks / decoder.up_blocks), in the same order."""
    flat: dict[str, int] = {}  # "encoder.down.0.block.1" -> its index in the flat list
    for side, level, kind in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        n = 0
        for i in range(count_matching(list(state), rf"{side}\.{level}\.(\d+)\.")):
            for j in range(count_matching(list(state), rf"{side}\.{level}\.{i}\.block\.(\d+)\.")):
                flat[f"{side}.{level}.{i}.block.{j}"], n = n, n + 1
            if f"{side}.{level}.{i}.{kind}.conv.weight" in state:
                flat[f"{side}.{level}.{i}.{kind}"], n = n, n + 1
    out = {}
    for key, tensor in state.items():
        new = key
        if m := re.match(r"(encoder|decoder)\.(down|up)\.\d+\.(block\.\d+|downsample|upsample)", key):
            name = f"{m[1]}.{m[2]}_blocks.{flat[m[0]]}"
            new = name + key[m.end():].replace("nin_shortcut", "conv_shortcut")
        elif m := re.match(r"(encoder|decoder)\.mid\.block_(\d)\.", key):
            new = f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}." + key[m.end():]
        elif m := re.match(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.", key):
            layer = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "proj"}.get(m[2], m[2])
            new = f"{m[1]}.mid_block.attentions.0.{layer}." + key[m.end():]
        out[new] = tensor
    return out


def vae_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """AutoencoderKLHunyuanImage's config from the original tensors' shapes (2.1: 6 levels of 128 to 1024 channels,
    2 resnets each, 5 downsamples = 32x, 64 latent channels)."""
    keys = list(state)
    levels = count_matching(keys, r"encoder\.down\.(\d+)\.")
    return {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
        "block_out_channels": tuple(int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0])
                                    for i in range(levels)),
        "layers_per_block": count_matching(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        "spatial_compression_ratio": 2 ** count_matching(keys, r"encoder\.down\.(\d+)\.downsample\."),
        "sample_size": VAE_SAMPLE_SIZE,
        "scaling_factor": VAE_SCALING,
    }


def load_vae(path: Path, dtype: torch.dtype) -> Any:
    from diffusers import AutoencoderKLHunyuanImage

    state = read_weights(path)
    if "decoder.conv_in.weight" not in state or "encoder.down.0.block.0.conv1.weight" not in state:
        raise UserError(f"{path}: not a HunyuanImage VAE (kohya's --vae): no encoder.down / decoder tensors")
    config = vae_config(state)
    try:
        with init_empty_weights():
            vae = AutoencoderKLHunyuanImage(**config)
    except ValueError as exc:
        raise UserError(f"{path}: not a HunyuanImage VAE (kohya's --vae): {str(exc).splitlines()[0][:200]}") from None
    return _assign(vae, vae_to_diffusers(state), dtype, path, "a HunyuanImage VAE (kohya's --vae)")


# ------------------------------------------------------------------------------------- text encoders
def qwen_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' older Qwen2.5-VL names (model.*, visual.*), which kohya's file has, as transformers 5 has them
    (model.language_model.*, model.visual.*); names already in the new layout stay."""
    out = {}
    for key, tensor in state.items():
        if key.startswith(("model.language_model.", "model.visual.")):
            out[key] = tensor
        elif key.startswith("model."):
            out["model.language_model." + key.removeprefix("model.")] = tensor
        elif key.startswith("visual."):
            out["model." + key] = tensor
        else:
            out[key] = tensor
    return out


def qwen_config(state: dict[str, torch.Tensor]) -> Any:
    from transformers import Qwen2_5_VLConfig

    keys = list(state)
    lm = "model.language_model."
    vocab, hidden = state[lm + "embed_tokens.weight"].shape
    kv_width = int(state[lm + "layers.0.self_attn.k_proj.weight"].shape[0])
    head_dim = QWEN_HEAD_DIM if kv_width % QWEN_HEAD_DIM == 0 else kv_width
    half = head_dim // 2  # multimodal rope sections (t, h, w) in 7B's 16:24:24 ratio; text-only prompts give all
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]  # three one position
    text = {"hidden_size": int(hidden), "vocab_size": int(vocab),
            "intermediate_size": int(state[lm + "layers.0.mlp.gate_proj.weight"].shape[0]),
            "num_hidden_layers": count_matching(keys, r"model\.language_model\.layers\.(\d+)\."),
            "num_attention_heads": int(state[lm + "layers.0.self_attn.q_proj.weight"].shape[0]) // head_dim,
            "num_key_value_heads": kv_width // head_dim, "rms_norm_eps": QWEN_RMS_EPS,
            "rope_scaling": {"rope_type": "default", "mrope_section": sections, "rope_theta": QWEN_ROPE_THETA}}
    patch = state["model.visual.patch_embed.proj.weight"]
    width = int(patch.shape[0])
    vision = {"depth": count_matching(keys, r"model\.visual\.blocks\.(\d+)\."), "hidden_size": width,
              "in_channels": int(patch.shape[1]), "temporal_patch_size": int(patch.shape[2]),
              "patch_size": int(patch.shape[3]),
              "intermediate_size": int(state["model.visual.blocks.0.mlp.gate_proj.weight"].shape[0]),
              "num_heads": width // QWEN_VISION_HEAD_DIM if width % QWEN_VISION_HEAD_DIM == 0 else 1,
              "out_hidden_size": int(state["model.visual.merger.mlp.2.weight"].shape[0])}
    ids = {k: v if v < vocab else None for k, v in QWEN_SPECIAL_IDS.items()}  # 7B's, where the vocabulary has them
    return Qwen2_5_VLConfig(text_config={**text, **ids}, vision_config=vision, **ids,
                            tie_word_embeddings="lm_head.weight" not in state)


def load_qwen(path: Path, dtype: torch.dtype) -> Any:
    from transformers import Qwen2_5_VLForConditionalGeneration

    state = qwen_state(read_weights(path))
    needed = ("model.language_model.embed_tokens.weight", "model.language_model.layers.0.self_attn.k_proj.weight",
              "model.visual.patch_embed.proj.weight", "model.visual.blocks.0.mlp.gate_proj.weight",
              "model.visual.merger.mlp.2.weight")
    if any(k not in state for k in needed):
        raise UserError(f"{path}: not a Qwen2.5-VL text encoder (kohya's --text_encoder): no model.* language "
                        "model and visual.* tower tensors")
    with init_empty_weights():  # parameters on meta; the rotary frequencies, computed buffers, built for real
        model = Qwen2_5_VLForConditionalGeneration(qwen_config(state))
    return _assign(model, state, dtype, path, "a Qwen2.5-VL text encoder (kohya's --text_encoder)")


def load_byt5(path: Path, dtype: torch.dtype) -> Any:
    """kohya's ByT5 (a T5 encoder state dict) as the T5EncoderModel the pipeline types, vocabulary as in the file
    (kohya's colour and font tokens included: the pipeline writes none, so they are never looked up)."""
    state = read_weights(path)
    if "shared.weight" not in state or "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight" \
            not in state:
        raise UserError(f"{path}: not a ByT5 encoder (kohya's --byt5): no shared / encoder.block tensors")
    return t5_from_state(state, dtype, path)


def byt5_tokenizer(cache_dir: str | None) -> Any:
    """kohya's google/byt5-small tokenizer: from its --tokenizer_cache_dir when saved there, else built here, as it
    holds no vocabulary (bytes plus 125 extra ids: ByT5Tokenizer's defaults are byt5-small's configuration)."""
    from transformers import ByT5Tokenizer

    local = Path(cache_dir) / BYT5_TOKENIZER.replace("/", "_") if cache_dir else None
    return ByT5Tokenizer.from_pretrained(str(local)) if local is not None and local.is_dir() else ByT5Tokenizer()


def _assign(model: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, where: Path, what: str) -> Any:
    """Load `state` into `model` (parameters built on the meta device) exactly: every tensor used, every weight
    given."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        shown = (missing or unexpected or wrong)[:3]
        raise UserError(f"{where}: does not fit {what} ({len(missing)} missing, {len(unexpected)} unexpected, "
                        f"{len(wrong)} misshapen tensors, e.g. {', '.join(shown)})")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{where}: no weights for {', '.join(left[:3])} of {what}")
    return model.eval()
