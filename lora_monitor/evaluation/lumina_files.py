"""A diffusers Lumina2Pipeline from a diffusers folder, or assembled from the separate files kohya trains Lumina 2 with.

kohya's lumina_train_network.py (library/lumina_util.py) takes `--pretrained_model_name_or_path` the NextDiT in
Alpha-VLLM's layout (lumina-image-2.safetensors, or Comfy's lumina_2_model_bf16.safetensors whose names carry
`model.diffusion_model.`), `--gemma2` a Gemma 2 2B state dict (transformers' Gemma2Model names, bare or under
`model.` as Gemma2ForCausalLM and Comfy's gemma_2_2b_fp16.safetensors have them) and `--ae` FLUX's autoencoder.
A Neta-Lumina all-in-one file may be given for all three: its parts are read from their prefixes
(`model.diffusion_model.`, `text_encoders.gemma2_2b.transformer.model.`, `vae.`), as kohya reads them. The tokenizer
is google/gemma-2-2b from the hub cache, or from `--tokenizer_cache_dir` used as the hub cache directory (kohya
passes it as `cache_dir`). kohya loads every model with strict=False, so tensors it has no use for are left out
here too (with a warning). Sizes are read from the tensors' shapes, so tiny models load; the large models are
built on the meta device first.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lora_monitor.errors import UserError
from lora_monitor.evaluation.flux_files import (
    AE_SCALING,
    AE_SHIFT,
    count_matching,
    ldm_vae,
    read_safetensors,
    require_parts,
)

log = logging.getLogger(__name__)

KOHYA_PARTS = ("gemma2", "ae")
GEMMA_TOKENIZER = "google/gemma-2-2b"  # kohya's strategy_lumina.GEMMA_ID
SCHEDULER_SHIFT = 6.0  # kohya's --discrete_flow_shift default, which its Lumina sampler uses
PATCH = 2  # kohya builds only the patch-2 NextDiT (NextDiT_2B_GQA_patch2_Adaln_Refiner) and packs latents 2 x 2
GEMMA_HEAD = 256  # Gemma 2 2B's attention heads are 256 wide (not hidden / heads), which no shape tells
# kohya's Gemma2Config (lumina_util.load_gemma2) apart from the sizes, which are read from the tensors here
GEMMA2_FIXED = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 4096,
                "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "attention_bias": False}
DIT_PREFIX = "model.diffusion_model."
GEMMA_PREFIXES = ("text_encoders.gemma2_2b.transformer.model.", "model.")  # Neta-Lumina's, Gemma2ForCausalLM's
AE_PREFIX = "vae."  # Neta-Lumina's


def load_lumina(base_model: str, parts: Mapping[str, str], dtype: torch.dtype) -> Any:
    """Lumina2Pipeline from a diffusers folder / hub id, or from kohya's NextDiT file plus `parts` (gemma2, ae, and
    optionally tokenizer_cache_dir)."""
    import diffusers

    path = Path(base_model)
    if not path.is_file():
        return diffusers.Lumina2Pipeline.from_pretrained(base_model, dtype=dtype)
    require_parts(base_model, parts, KOHYA_PARTS, "a Lumina 2 transformer file", "Lumina 2")
    files = _Files()  # a Neta-Lumina file given for several parts is read once
    transformer = load_transformer(files.read(path), path, dtype)
    text_encoder = load_gemma2(files.read(Path(parts["gemma2"])), Path(parts["gemma2"]), dtype)
    vae = load_ae(files.read(Path(parts["ae"])), Path(parts["ae"]), dtype)
    if transformer.config.cap_feat_dim != text_encoder.config.hidden_size:
        raise UserError(f"{parts['gemma2']}: a Gemma 2 of width {text_encoder.config.hidden_size}, but the "
                        f"transformer {path.name} reads captions of width {transformer.config.cap_feat_dim}; "
                        "check kohya's --gemma2")
    if transformer.config.in_channels != vae.config.latent_channels:
        raise UserError(f"{parts['ae']}: an autoencoder of {vae.config.latent_channels} latent channels, but the "
                        f"transformer {path.name} reads {transformer.config.in_channels}; check kohya's --ae")
    return diffusers.Lumina2Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=SCHEDULER_SHIFT),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=gemma_tokenizer(parts.get("tokenizer_cache_dir")),
    )


class _Files:
    def __init__(self) -> None:
        self._read: dict[Path, dict[str, torch.Tensor]] = {}

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        key = path.resolve()
        if key not in self._read:
            self._read[key] = read_safetensors(path)
        return self._read[key]


def _unprefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def empty_model(build: Any, state: dict[str, torch.Tensor], dtype: torch.dtype, where: Path, what: str) -> Any:
    """`build()` with `state` as its weights, its own (random) ones never allocated. Unlike flux_files.on_meta only
    the parameters start on the meta device: both models compute tables at construction that are no buffers (the
    NextDiT's RoPE frequencies) or not saved (Gemma's RoPE and embedding scale), which must be real. Tensors the
    model does not have are dropped first, as kohya's strict=False loading ignores them."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    state = _keep_known(state, set(model.state_dict()), where, what)
    try:
        missing, _ = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of another size than the first layer's shapes make it
        raise UserError(f"{where}: does not fit {what} ({str(exc).splitlines()[-1].strip()[:200]})") from None
    left = [n for n, t in model.named_parameters() if t.is_meta]
    if missing or left:
        shown = (list(missing) or left)[:3]
        raise UserError(f"{where}: does not fit {what}: {len(missing)} missing tensors, e.g. {', '.join(shown)}")
    return model.to(dtype).eval()


def _keep_known(state: dict[str, torch.Tensor], known: set[str], where: Path, what: str) -> dict[str, torch.Tensor]:
    """Drop the tensors `known` does not name, as kohya's strict=False loading ignores them."""
    unused = sorted(set(state) - known)
    if unused:
        log.warning("%s: %d %s tensors not used, e.g. %s", where, len(unused), what, ", ".join(unused[:3]))
    return {k: v for k, v in state.items() if k in known}


# ---------------------------------------------------------------------------------------------- transformer
def nextdit_state(checkpoint: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The NextDiT's tensors in Alpha-VLLM's names, without Comfy's / Neta-Lumina's prefix."""
    state = _unprefixed(checkpoint, DIT_PREFIX) if f"{DIT_PREFIX}cap_embedder.0.weight" in checkpoint else checkpoint
    if "x_embedder.weight" not in state or "cap_embedder.1.weight" not in state:
        if "time_caption_embed.caption_embedder.1.weight" in checkpoint:
            raise UserError(f"{where}: a Lumina 2 transformer in diffusers' layout; set [eval] base_model to the "
                            "diffusers folder it belongs to")
        raise UserError(f"{where}: not a Lumina 2 NextDiT (no x_embedder / cap_embedder tensors), which kohya's "
                        "--pretrained_model_name_or_path needs")
    if "layers.0.attention.q_norm.weight" not in state or "layers.0.attention.qkv.weight" not in state:
        raise UserError(f"{where}: a NextDiT without layers.0.attention qkv / q_norm tensors; Lumina 2's has both")
    return state


def transformer_config(state: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """Lumina2Transformer2DModel's config from the NextDiT's tensor shapes (Alpha-VLLM's names, no prefix)."""
    keys = list(state)
    hidden, patch_in = (int(n) for n in state["x_embedder.weight"].shape)
    head_dim = int(state["layers.0.attention.q_norm.weight"].shape[0])
    kv_rows = int(state["layers.0.attention.qkv.weight"].shape[0]) - hidden
    if hidden % head_dim or kv_rows % (2 * head_dim) or head_dim % 2 or patch_in % PATCH**2:
        raise UserError(f"{where}: NextDiT shapes do not fit together (width {hidden}, heads of {head_dim}, "
                        f"{kv_rows} key/value rows, patch input {patch_in})")
    ffn = int(state["layers.0.feed_forward.w1.weight"].shape[0])
    # Lumina 2's RoPE splits its 96-wide heads (32, 32, 32): caption index, height, width. For another width the
    # two image axes take the smallest even size >= a third each and the caption axis the rest.
    image_axis = 2 * -(-head_dim // 6)
    out_channels = int(state["final_layer.linear.weight"].shape[0]) // PATCH**2
    return {
        "sample_size": 128,  # Lumina-Image-2.0's (1024 px); no tensor fixes it
        "patch_size": PATCH,
        "in_channels": patch_in // PATCH**2,
        "out_channels": out_channels if out_channels != patch_in // PATCH**2 else None,
        "hidden_size": hidden,
        "num_layers": count_matching(keys, r"layers\.(\d+)\."),
        "num_refiner_layers": count_matching(keys, r"noise_refiner\.(\d+)\."),
        "num_attention_heads": hidden // head_dim,
        "num_kv_heads": kv_rows // (2 * head_dim),
        # the FFN width itself as the multiple, scaled down where it is narrower than 4 x hidden: any width fits
        "multiple_of": ffn,
        "ffn_dim_multiplier": None if ffn >= 4 * hidden else ffn / (4 * hidden),
        "norm_eps": 1e-5,
        "axes_dim_rope": (head_dim - 2 * image_axis, image_axis, image_axis),
        "axes_lens": (300, 512, 512),
        "cap_feat_dim": int(state["cap_embedder.1.weight"].shape[1]),
    }


def split_fused(state: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Split the fused qkv rows at this model's widths (diffusers' converter hard-codes Lumina 2's 2304 / 768) and
    name every context refiner's norms (its converter names only refiners 0 and 1)."""
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    sizes = [config["hidden_size"], config["num_kv_heads"] * head_dim, config["num_kv_heads"] * head_dim]
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(".attention.qkv.weight"):
            stem = key.removesuffix("qkv.weight")
            out.update({f"{stem}to_{n}.weight": t for n, t in zip("qkv", tensor.split(sizes), strict=True)})
        else:
            out[re.sub(r"^(context_refiner\.\d+\.)attention_norm(\d)", r"\1norm\2", key)] = tensor
    return out


def load_transformer(checkpoint: dict[str, torch.Tensor], where: Path, dtype: torch.dtype) -> Any:
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    state = nextdit_state(checkpoint, where)
    config = transformer_config(state, where)
    converted = convert_lumina2_to_diffusers(split_fused(state, config))
    return empty_model(lambda: Lumina2Transformer2DModel(**config), converted, dtype, where,
                       "a Lumina 2 NextDiT (kohya's --pretrained_model_name_or_path)")


# ---------------------------------------------------------------------------------------------- Gemma 2, AE
def gemma2_config(state: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """Gemma2Config from the tensor shapes: heads 256 wide as Gemma 2 2B's (a model whose key/value rows are fewer
    is read as one key/value head of that width), query scaled by the head width as Gemma 2 2B's."""
    vocab, hidden = (int(n) for n in state["embed_tokens.weight"].shape)
    q_rows = int(state["layers.0.self_attn.q_proj.weight"].shape[0])
    k_rows = int(state["layers.0.self_attn.k_proj.weight"].shape[0])
    head_dim = min(GEMMA_HEAD, k_rows)
    if q_rows % head_dim or k_rows % head_dim:
        raise UserError(f"{where}: Gemma 2 attention of {q_rows} query and {k_rows} key rows does not split into "
                        f"heads of {head_dim}")
    return {**GEMMA2_FIXED, "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": int(state["layers.0.mlp.gate_proj.weight"].shape[0]),
            "num_hidden_layers": count_matching(list(state), r"layers\.(\d+)\."),
            "num_attention_heads": q_rows // head_dim, "num_key_value_heads": k_rows // head_dim,
            "head_dim": head_dim, "query_pre_attn_scalar": head_dim}


def load_gemma2(checkpoint: dict[str, torch.Tensor], where: Path, dtype: torch.dtype) -> Any:
    """A transformers Gemma2Model, as kohya's load_gemma2 builds it, from any of the layouts it reads."""
    from transformers import Gemma2Config, Gemma2Model

    state = checkpoint
    for prefix in GEMMA_PREFIXES:
        if f"{prefix}embed_tokens.weight" in checkpoint:
            state = _unprefixed(checkpoint, prefix)
            break
    if "embed_tokens.weight" not in state or "layers.0.self_attn.q_proj.weight" not in state:
        raise UserError(f"{where}: not a Gemma 2 text encoder (kohya's --gemma2): no embed_tokens / self_attn tensors")
    config = Gemma2Config(**gemma2_config(state, where))
    return empty_model(lambda: Gemma2Model._from_config(config), state, dtype, where,
                       "a Gemma 2 text encoder (kohya's --gemma2)")


def load_ae(checkpoint: dict[str, torch.Tensor], where: Path, dtype: torch.dtype) -> Any:
    """FLUX's autoencoder, which Lumina 2 uses, from BFL's ae.safetensors layout or Neta-Lumina's `vae.` one."""
    state = checkpoint
    if f"{AE_PREFIX}decoder.conv_in.bias" in checkpoint:
        state = _unprefixed(checkpoint, AE_PREFIX)
    return ldm_vae(state, dtype, where, "FLUX's autoencoder (kohya's --ae)", AE_SCALING, AE_SHIFT)


def gemma_tokenizer(cache_dir: str | None) -> Any:
    """kohya's tokenizer: google/gemma-2-2b from the hub cache, or from --tokenizer_cache_dir as the cache."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(GEMMA_TOKENIZER, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        into = f" --cache-dir {cache_dir}" if cache_dir else ""  # kohya's --tokenizer_cache_dir is a hub cache
        raise UserError(f"tokenizer {GEMMA_TOKENIZER} could not be loaded ({str(exc).splitlines()[0][:200]}); "
                        f"download it with `hf download {GEMMA_TOKENIZER}{into}` (a gated model: accept its licence "
                        "on the hub first)") from None
