"""A diffusers FluxPipeline from a diffusers folder, or assembled from the separate files kohya trains FLUX.1 with.

kohya's flux_train_network.py takes the model in pieces (library/flux_utils.py): `--pretrained_model_name_or_path`
the FLUX transformer (BFL's layout, as black-forest-labs ships flux1-dev.safetensors, or diffusers' layout, in any
dtype incl. fp8), `--clip_l` a transformers CLIPTextModel state dict, `--t5xxl` a T5EncoderModel state dict and
`--ae` BFL's autoencoder; its tokenizers come from the hub (openai/clip-vit-large-patch14, google/t5-v1_1-xxl) or
from `--tokenizer_cache_dir`, where kohya saves them as `<dir>/openai_clip-vit-large-patch14` etc. The same files
build the evaluation pipeline here, each model's size read from its tensors' shapes (so pruned or tiny models
load too), the large ones on the meta device first so no random weights are ever allocated.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lora_monitor.checkpoints import flux_keys
from lora_monitor.errors import UserError

CLIP_L_TOKENIZER = "openai/clip-vit-large-patch14"  # kohya's strategy_flux.CLIP_L_TOKENIZER_ID
T5_XXL_TOKENIZER = "google/t5-v1_1-xxl"  # kohya's strategy_flux.T5_XXL_TOKENIZER_ID
FLUX_ROPE_AXES = (16, 56, 56)  # FLUX.1's rotary split of its 128-wide attention heads (BFL's axes_dim)
AE_SCALING, AE_SHIFT = 0.3611, 0.1159  # BFL's AutoEncoderParams scale_factor / shift_factor
# FLUX.1-dev's scheduler_config.json; schnell uses a fixed shift of 1.0 instead
DEV_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                 "base_image_seq_len": 256, "max_image_seq_len": 4096}
SCHNELL_SCHEDULER = {"shift": 1.0, "use_dynamic_shifting": False}
KOHYA_PARTS = ("clip_l", "t5xxl", "ae")
_NORMS = (  # BFL's q/k RMSNorm scales -> diffusers' norm weights
    (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale", "transformer_blocks.{0}.attn.norm_q.weight"),
    (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale", "transformer_blocks.{0}.attn.norm_k.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale", "transformer_blocks.{0}.attn.norm_added_q.weight"),
    (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale", "transformer_blocks.{0}.attn.norm_added_k.weight"),
    (r"single_blocks\.(\d+)\.norm\.query_norm\.scale", "single_transformer_blocks.{0}.attn.norm_q.weight"),
    (r"single_blocks\.(\d+)\.norm\.key_norm\.scale", "single_transformer_blocks.{0}.attn.norm_k.weight"),
)


def load_flux(base_model: str, parts: Mapping[str, str], dtype: torch.dtype) -> Any:
    """FluxPipeline from a diffusers folder / hub id, or from kohya's transformer file plus `parts` (clip_l, t5xxl,
    ae, and optionally tokenizer_cache_dir)."""
    import diffusers

    path = Path(base_model)
    if not path.is_file():
        return diffusers.FluxPipeline.from_pretrained(base_model, dtype=dtype)
    require_parts(base_model, parts, KOHYA_PARTS, "a FLUX transformer file", "FLUX.1")
    cache = parts.get("tokenizer_cache_dir")
    transformer = load_transformer(path, dtype)
    schedule = DEV_SCHEDULER if transformer.config.guidance_embeds else SCHNELL_SCHEDULER
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**schedule),
        vae=load_ae(Path(parts["ae"]), dtype),
        text_encoder=load_clip_l(Path(parts["clip_l"]), dtype),
        tokenizer=kohya_tokenizer("CLIPTokenizer", CLIP_L_TOKENIZER, cache),
        text_encoder_2=load_t5(Path(parts["t5xxl"]), dtype),
        tokenizer_2=kohya_tokenizer("T5TokenizerFast", T5_XXL_TOKENIZER, cache),
        transformer=transformer,
    )


def require_parts(base_model: str, parts: Mapping[str, str], names: tuple[str, ...], what: str, family: str) -> None:
    """UserError (one line) unless kohya's model files `names` are all given in `parts` and exist."""
    missing = [f"--{name}" for name in names if not parts.get(name)]
    if missing:
        raise UserError(f"base model {base_model} is {what} alone: kohya's {', '.join(missing)} must be given "
                        f"too (in [kohya.args] or its config_file), or set [eval] base_model to a diffusers {family} "
                        "folder")
    for name in names:
        if not Path(parts[name]).is_file():
            raise UserError(f"kohya's --{name} file {parts[name]} does not exist; check the path")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if path.suffix != ".safetensors":
        raise UserError(f"{path}: only .safetensors model files are loaded (no pickle); convert it")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise UserError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0][:200]})") from None


def count_matching(keys: list[str], pattern: str) -> int:
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def on_meta(cls: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, where: Path, **config: Any) -> Any:
    """`cls(**config)` with `state` as its weights, built without allocating its own (random) ones."""
    with torch.device("meta"):
        model = cls(**config) if not hasattr(cls, "config_class") else cls(cls.config_class(**config))
    state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"encoder.embed_tokens.weight"}  # T5's input embedding is its `shared` table
    if set(missing) - tied or unexpected:
        shown = sorted(set(missing) - tied)[:3] or sorted(unexpected)[:3]
        raise UserError(f"{where}: does not fit a {cls.__name__} ({len(set(missing) - tied)} missing, "
                        f"{len(unexpected)} unexpected tensors, e.g. {', '.join(shown)})")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{where}: no weights for {', '.join(left[:3])} of its {cls.__name__}")
    return model.eval()


# ---------------------------------------------------------------------------------------------- transformer
def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL's FLUX transformer weights as diffusers' FluxTransformer2DModel names them, fused layers split by rows
    (the same split as the LoRA modules', flux_keys.transformer_parts), at any width."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, leaf = key.rpartition(".")
        if leaf in ("weight", "bias") and not module.endswith("_norm"):
            weight = state[f"{module}.weight"]
            parts = flux_keys.transformer_parts(module.replace(".", "_"), weight.shape[0], weight.shape[-1])
            if parts is None:
                raise UserError(f"FLUX transformer tensor {key} has no diffusers counterpart")
            for part in parts:
                out[f"{part.path}.{leaf}"] = part.take(tensor)
            continue
        for pattern, path in _NORMS:
            if m := re.fullmatch(pattern, key):
                out[path.format(*m.groups())] = tensor
                break
        else:
            raise UserError(f"FLUX transformer tensor {key} has no diffusers counterpart")
    return out


def transformer_config(state: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """FluxTransformer2DModel's config from BFL tensor shapes (FLUX.1: hidden 3072, 19 + 38 blocks, heads of 128)."""
    keys = list(state)
    hidden, in_channels = state["img_in.weight"].shape
    head_dim = state["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    if head_dim != sum(FLUX_ROPE_AXES):
        raise UserError(f"{where}: attention heads of {head_dim}, not FLUX.1's {sum(FLUX_ROPE_AXES)}: its rotary "
                        "split is unknown; set [eval] base_model to the model's diffusers folder")
    return {
        "patch_size": 1,
        "in_channels": int(in_channels),
        "out_channels": int(state["final_layer.linear.weight"].shape[0]),
        "num_layers": count_matching(keys, r"double_blocks\.(\d+)\."),
        "num_single_layers": count_matching(keys, r"single_blocks\.(\d+)\."),
        "attention_head_dim": int(head_dim),
        "num_attention_heads": int(hidden // head_dim),
        "joint_attention_dim": int(state["txt_in.weight"].shape[1]),
        "pooled_projection_dim": int(state["vector_in.in_layer.weight"].shape[1]),
        "guidance_embeds": "guidance_in.in_layer.weight" in state,
        "axes_dims_rope": FLUX_ROPE_AXES,
    }


def load_transformer(path: Path, dtype: torch.dtype) -> Any:
    from diffusers import FluxTransformer2DModel

    state = {k.removeprefix("model.diffusion_model."): v for k, v in read_safetensors(path).items()}
    if "transformer_blocks.0.attn.add_k_proj.bias" in state:  # already diffusers' layout (kohya reads both)
        raise UserError(f"{path}: a FLUX transformer in diffusers' layout; set [eval] base_model to the diffusers "
                        "folder it belongs to")
    if "img_in.weight" not in state or "double_blocks.0.img_attn.norm.query_norm.scale" not in state:
        raise UserError(f"{path}: not a FLUX.1 transformer (no img_in / double_blocks tensors)")
    config = transformer_config(state, path)
    return on_meta(FluxTransformer2DModel, bfl_to_diffusers(state), dtype, path, **config)


# ------------------------------------------------------------------------------------- autoencoder, encoders
def load_ae(path: Path, dtype: torch.dtype) -> Any:
    """BFL's autoencoder (the LDM VAE layout without quant convs, 16 latent channels) as an AutoencoderKL."""
    return ldm_vae(read_safetensors(path), dtype, path, "FLUX.1's autoencoder (kohya's --ae)", AE_SCALING, AE_SHIFT)


def ldm_vae(state: dict[str, torch.Tensor], dtype: torch.dtype, where: Path, what: str, scaling: float,
            shift: float) -> Any:
    """An AutoencoderKL from LDM-layout weights without quant convs (FLUX.1's and SD3's), sized from the shapes."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    keys = list(state)
    if "decoder.conv_in.weight" not in state or "encoder.down.0.block.0.conv1.weight" not in state:
        raise UserError(f"{where}: not {what}: no encoder/decoder tensors")
    levels = count_matching(keys, r"encoder\.down\.(\d+)\.")
    config = {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
        "block_out_channels": tuple(int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0])
                                    for i in range(levels)),
        "layers_per_block": count_matching(keys, r"encoder\.down\.0\.block\.(\d+)\."),
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "norm_num_groups": 32,  # BFL's AE normalises in 32 groups everywhere
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "scaling_factor": scaling,
        "shift_factor": shift,
    }
    vae = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(state, config)
    try:
        vae.load_state_dict(converted, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{where}: does not fit {what} ({str(exc).splitlines()[0][:200]})") from None
    return vae.to(dtype).eval()


def load_clip_l(path: Path, dtype: torch.dtype) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    state = {k.removeprefix("text_model."): v for k, v in read_safetensors(path).items()
             if not k.endswith("position_ids")}
    if "embeddings.token_embedding.weight" not in state:
        raise UserError(f"{path}: not a CLIP-L text encoder (kohya's --clip_l): no token embedding")
    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    config = CLIPTextConfig(
        vocab_size=int(vocab), hidden_size=int(hidden), num_attention_heads=max(1, int(hidden) // 64),
        intermediate_size=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=count_matching(list(state), r"encoder\.layers\.(\d+)\."),
        max_position_embeddings=int(state["embeddings.position_embedding.weight"].shape[0]),
        projection_dim=int(hidden), hidden_act="quick_gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # kohya's CLIPL_CONFIG: eos 2 pools at the highest id
    )
    model = CLIPTextModel(config)  # 123M parameters: built normally, its position ids are a computed buffer
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    missing, unexpected = model.load_state_dict({prefix + k: v for k, v in state.items()}, strict=False)
    if [k for k in missing if not k.endswith("position_ids")] or unexpected:
        raise UserError(f"{path}: does not fit a CLIP-L text encoder ({len(missing)} missing, "
                        f"{len(unexpected)} unexpected tensors)")
    return model.to(dtype).eval()


def load_t5(path: Path, dtype: torch.dtype) -> Any:
    return t5_from_state(read_safetensors(path), dtype, path)


def t5_from_state(state: dict[str, torch.Tensor], dtype: torch.dtype, path: Path) -> Any:
    """A T5EncoderModel from its transformers state dict, sized from the shapes."""
    from transformers import T5EncoderModel

    bias = state.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if "shared.weight" not in state or bias is None:
        raise UserError(f"{path}: not a T5 encoder (kohya's --t5xxl): no shared / relative_attention_bias tensors")
    vocab, d_model = state["shared.weight"].shape
    heads = int(bias.shape[1])
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    d_ff = state["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"].shape[0]
    return on_meta(
        T5EncoderModel, state, dtype, path,
        vocab_size=int(vocab), d_model=int(d_model), num_heads=heads,
        d_kv=int(state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]) // heads, d_ff=int(d_ff),
        num_layers=count_matching(list(state), r"encoder\.block\.(\d+)\."),
        relative_attention_num_buckets=int(bias.shape[0]),
        feed_forward_proj="gated-gelu" if gated else "relu",
    )


def kohya_tokenizer(class_name: str, hub_id: str, cache_dir: str | None) -> Any:
    """kohya's tokenizer: from `<tokenizer_cache_dir>/<hub id with _ for />` when there, else the hub (cache)."""
    import transformers

    cls = getattr(transformers, class_name)
    local = Path(cache_dir) / hub_id.replace("/", "_") if cache_dir else None
    source = str(local) if local is not None and local.is_dir() else hub_id
    try:
        return cls.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"tokenizer {hub_id} could not be loaded ({str(exc).splitlines()[0][:200]}); download it "
                        f"with `hf download {hub_id}` or give kohya's --tokenizer_cache_dir") from None
