"""An Anima pipeline from a diffusers folder, or assembled from the separate files kohya trains Anima with.

kohya's anima_train_network.py (library/anima_utils.py) takes `--pretrained_model_name_or_path` the DiT, a
Cosmos-Predict2 network in NVIDIA's names (optionally under ComfyUI's `net.` prefix) that also holds the LLM adapter
under `llm_adapter.`; `--qwen3` the Qwen3-0.6B text encoder, a transformers folder or a state-dict file (with or
without `model.`); `--vae` the Qwen-Image VAE, in diffusers' names or ComfyUI's (Wan's); `--t5_tokenizer_path` a T5
tokenizer folder (its token ids feed the adapter; T5 itself is not used). kohya takes the Qwen tokenizer from the
--qwen3 folder, or from its bundled copy of Qwen3-0.6B's / t5-v1_1-xxl's when given files; here those come from the
hub cache. kohya declares `--llm_adapter_path` but never reads it: the adapter it trained with is the DiT file's, so
that one is used whenever the file has it and the separate file only when it has not.

Each model is sized from its tensors' shapes (tiny or pruned models load too) and built on the meta device first;
NVIDIA's names become diffusers' by diffusers' own Cosmos and Wan-VAE converters. The result is the AnimaPipeline
a diffusers folder gives, with the same components.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lora_monitor.errors import UserError
from lora_monitor.evaluation.anima_pipeline import AnimaPipeline
from lora_monitor.evaluation.flux_files import count_matching, on_meta, read_safetensors

log = logging.getLogger(__name__)

KOHYA_PARTS = ("qwen3", "vae")  # required with a DiT file; llm_adapter_path and t5_tokenizer_path are optional
# the tokenizers kohya bundles (configs/qwen3_06b, configs/t5_old) are these hub repositories'
QWEN3_TOKENIZER, T5_TOKENIZER = "Qwen/Qwen3-0.6B", "google/t5-v1_1-xxl"
QWEN3_ROPE_THETA, QWEN3_EPS, QWEN3_POSITIONS = 1_000_000.0, 1e-6, 40960  # Qwen3-0.6B's config.json, as kohya's
# kohya's fixed Anima DiT config (anima_utils.load_anima_model): max_frames / max_img_h / max_img_w (only a bound on
# the rotary positions) and rope_{t,h,w}_extrapolation_ratio
DIT_MAX_SIZE, DIT_ROPE_SCALE = (128, 512, 512), (1.0, 4.0, 4.0)
TOKENIZER_FILES = {"Qwen2Tokenizer": ("tokenizer.json", "vocab.json"),
                   "T5TokenizerFast": ("tokenizer.json", "spiece.model")}
SAMPLE_SHIFT = 3.0  # kohya samples Anima with flow_shift 3.0 (anima_train_utils.sample_image_inference)
ADAPTER = "llm_adapter."


def load_anima(base_model: str, parts: Mapping[str, str], dtype: torch.dtype) -> AnimaPipeline:
    """AnimaPipeline from a diffusers modular folder / hub id, or from kohya's DiT file plus `parts` (qwen3, vae,
    and optionally llm_adapter_path, t5_tokenizer_path)."""
    import diffusers
    from diffusers.modular_pipelines import AnimaAutoBlocks

    path = Path(base_model)
    if not path.is_file():
        return AnimaPipeline.from_pretrained(base_model, dtype)
    missing = [f"--{name}" for name in KOHYA_PARTS if not parts.get(name)]
    if missing:
        raise UserError(f"base model {base_model} is an Anima DiT file alone: kohya's {', '.join(missing)} must be "
                        "given too (in [kohya.args] or its config_file), or set [eval] base_model to a diffusers "
                        "modular Anima folder")
    for name in (*KOHYA_PARTS, "llm_adapter_path", "t5_tokenizer_path"):
        if parts.get(name) and not Path(parts[name]).exists():
            raise UserError(f"kohya's --{name} {parts[name]} does not exist; check the path")
    state = dit_state(read_safetensors(path), path)
    adapter = {k.removeprefix(ADAPTER): state.pop(k) for k in [k for k in state if k.startswith(ADAPTER)]}
    adapter_file = _adapter_source(path, bool(adapter), parts.get("llm_adapter_path"))
    if adapter_file != path:
        adapter = {k.removeprefix("net.").removeprefix(ADAPTER): v for k, v in read_safetensors(adapter_file).items()}
    text_encoder, tokenizer = load_qwen3(Path(parts["qwen3"]), dtype)
    full = AnimaAutoBlocks().init_pipeline()
    full.update_components(
        transformer=load_transformer(state, path, dtype),
        text_conditioner=load_adapter(adapter, adapter_file, dtype),
        text_encoder=text_encoder, tokenizer=tokenizer,
        t5_tokenizer=_tokenizer("T5TokenizerFast", parts.get("t5_tokenizer_path"), T5_TOKENIZER, "t5_tokenizer_path"),
        vae=load_vae(Path(parts["vae"]), dtype),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=SAMPLE_SHIFT),
    )
    return AnimaPipeline(full)


def _adapter_source(dit: Path, inside: bool, separate: str | None) -> Path:
    if inside:
        if separate:
            log.warning("%s holds the LLM adapter: kohya trains with that one (it does not read --llm_adapter_path "
                        "%s), so it is the one used here too", dit.name, separate)
        return dit
    if not separate:
        raise UserError(f"{dit}: no LLM adapter (llm_adapter.* tensors) in this Anima DiT file; give kohya's "
                        "--llm_adapter_path, or the DiT file that holds it")
    return Path(separate)


# ---------------------------------------------------------------------------------------------- DiT, adapter
def transformer_config(state: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """CosmosTransformer3DModel's config from the DiT's tensor shapes in NVIDIA's names (no prefix). Anima's patch
    embedding takes the latents plus a padding-mask channel, so (in + 1) * p^2 inputs against out * p^2 outputs of
    the final layer give the patch size p with in = out channels."""
    hidden, embed_in = state["x_embedder.proj.1.weight"].shape
    final_out = int(state["final_layer.linear.weight"].shape[0])
    patch = math.isqrt(max(0, int(embed_in) - final_out))
    if patch < 1 or patch * patch != embed_in - final_out or final_out % (patch * patch):
        raise UserError(f"{where}: patch embedding of {embed_in} inputs and final layer of {final_out} outputs do "
                        "not fit Anima's latents + padding-mask channel layout")
    head_dim = int(state["blocks.0.self_attn.q_norm.weight"].shape[0])
    return {
        "in_channels": final_out // patch**2,
        "out_channels": final_out // patch**2,
        "num_attention_heads": int(hidden) // head_dim,
        "attention_head_dim": head_dim,
        "num_layers": count_matching(list(state), r"blocks\.(\d+)\."),
        "mlp_ratio": state["blocks.0.mlp.layer1.weight"].shape[0] / int(hidden),
        "text_embed_dim": int(state["blocks.0.cross_attn.k_proj.weight"].shape[1]),
        "adaln_lora_dim": int(state["blocks.0.adaln_modulation_self_attn.1.weight"].shape[0]),
        "max_size": DIT_MAX_SIZE,
        "patch_size": (1, patch, patch),
        "rope_scale": DIT_ROPE_SCALE,
        "concat_padding_mask": True,
        "extra_pos_embed_type": None,
    }


def dit_state(checkpoint: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The DiT file's tensors in NVIDIA's names without ComfyUI's `net.` prefix, as kohya's load_anima_model reads
    them."""
    state = {k.removeprefix("net."): v for k, v in checkpoint.items()}
    if "transformer_blocks.0.attn1.to_q.weight" in state:
        raise UserError(f"{where}: an Anima transformer in diffusers' layout; set [eval] base_model to the "
                        "diffusers folder it belongs to")
    needed = ("x_embedder.proj.1.weight", "blocks.0.self_attn.q_norm.weight", "final_layer.linear.weight")
    if any(k not in state for k in needed):
        raise UserError(f"{where}: not an Anima DiT (no x_embedder / blocks / final_layer tensors), which kohya's "
                        "--pretrained_model_name_or_path needs")
    return state


def load_transformer(state: dict[str, torch.Tensor], where: Path, dtype: torch.dtype) -> Any:
    """CosmosTransformer3DModel from the DiT's tensors (dit_state), adapter left out (load_anima)."""
    from diffusers import CosmosTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_cosmos_transformer_checkpoint_to_diffusers

    config = transformer_config(state, where)
    converted = convert_cosmos_transformer_checkpoint_to_diffusers(dict(state))  # drops the rotary tables too
    return on_meta(CosmosTransformer3DModel, converted, dtype, where, **config)


def adapter_config(state: dict[str, torch.Tensor], where: Path) -> dict[str, Any]:
    """AnimaTextConditioner's config from the LLM adapter's shapes (kohya's names without `llm_adapter.`)."""
    if "embed.weight" not in state or "blocks.0.cross_attn.q_norm.weight" not in state:
        raise UserError(f"{where}: not an Anima LLM adapter (kohya's --llm_adapter_path): no embed / cross_attn "
                        "tensors")
    vocab, target = state["embed.weight"].shape
    model_dim = int(state["in_proj.weight"].shape[0]) if "in_proj.weight" in state else int(target)
    return {
        "source_dim": int(state["blocks.0.cross_attn.k_proj.weight"].shape[1]), "target_dim": int(target),
        "model_dim": model_dim, "num_layers": count_matching(list(state), r"blocks\.(\d+)\."),
        "num_attention_heads": model_dim // int(state["blocks.0.cross_attn.q_norm.weight"].shape[0]),
        "target_vocab_size": int(vocab), "mlp_ratio": state["blocks.0.mlp.0.weight"].shape[0] / model_dim,
        "use_self_attention": "blocks.0.self_attn.q_proj.weight" in state,
        "use_layer_norm": "blocks.0.norm_cross_attn.bias" in state,  # kohya's RMSNorms have no bias
    }


def load_adapter(state: dict[str, torch.Tensor], where: Path, dtype: torch.dtype) -> Any:
    """AnimaTextConditioner (diffusers' LLM adapter, in kohya's names) sized from its shapes."""
    from diffusers import AnimaTextConditioner
    from diffusers.models.condition_embedders.condition_embedder_anima import AnimaRotaryEmbedding

    config = adapter_config(state, where)
    head_dim = config["model_dim"] // config["num_attention_heads"]
    return _on_meta_rotary(AnimaTextConditioner, lambda m: AnimaRotaryEmbedding(head_dim), state, dtype, where,
                           "an Anima LLM adapter", config)


def _on_meta_rotary(cls: Any, rotary: Callable[[Any], torch.nn.Module], state: dict[str, torch.Tensor],
                    dtype: torch.dtype, where: Path, what: str, config: Any) -> Any:
    """`cls(config)` on the meta device with `state` as its weights and its rotary embedding, whose frequencies are
    computed rather than stored, built for real (on_meta for models with such a buffer)."""
    with torch.device("meta"):
        model = cls(config) if not isinstance(config, dict) else cls(**config)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False,
                                                assign=True)
    if missing or unexpected:
        raise UserError(f"{where}: does not fit {what} ({len(missing)} missing, {len(unexpected)} unexpected "
                        f"tensors, e.g. {', '.join((missing or unexpected)[:3])})")
    with torch.device("cpu"):
        model.rotary_emb = rotary(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{where}: no weights for {', '.join(left[:3])} of {what}")
    return model.eval()


# ---------------------------------------------------------------------------------------------- Qwen3, tokenizers
def load_qwen3(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """kohya's --qwen3: a transformers folder (model and tokenizer) or a state-dict file (Qwen3-0.6B's tokenizer)."""
    from transformers import Qwen3Model

    if path.is_dir():
        try:
            model = Qwen3Model.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise UserError(f"kohya's --qwen3 folder {path} holds no Qwen3 model in safetensors "
                            f"({str(exc).splitlines()[0][:200]})") from None
        return model.eval(), _tokenizer("Qwen2Tokenizer", str(path), QWEN3_TOKENIZER, "qwen3")
    state = {k.removeprefix("model."): v for k, v in read_safetensors(path).items() if k != "lm_head.weight"}
    return qwen3_from_state(state, dtype, path), _tokenizer("Qwen2Tokenizer", None, QWEN3_TOKENIZER, "qwen3")


def qwen3_config(state: dict[str, torch.Tensor], where: Path) -> Any:
    """Qwen3Config from a Qwen3Model's shapes: the per-head q/k norms give the head width, hence both head counts;
    what shapes do not show is Qwen3-0.6B's."""
    from transformers import Qwen3Config

    if "embed_tokens.weight" not in state or "layers.0.self_attn.q_norm.weight" not in state:
        raise UserError(f"{where}: not a Qwen3 text encoder (kohya's --qwen3): no embed_tokens / q_norm tensors")
    vocab, hidden = state["embed_tokens.weight"].shape
    head_dim = int(state["layers.0.self_attn.q_norm.weight"].shape[0])
    return Qwen3Config(
        vocab_size=int(vocab), hidden_size=int(hidden), head_dim=head_dim,
        intermediate_size=int(state["layers.0.mlp.gate_proj.weight"].shape[0]),
        num_hidden_layers=count_matching(list(state), r"layers\.(\d+)\."),
        num_attention_heads=int(state["layers.0.self_attn.q_proj.weight"].shape[0]) // head_dim,
        num_key_value_heads=int(state["layers.0.self_attn.k_proj.weight"].shape[0]) // head_dim,
        attention_bias="layers.0.self_attn.q_proj.bias" in state, rms_norm_eps=QWEN3_EPS,
        max_position_embeddings=QWEN3_POSITIONS, rope_theta=QWEN3_ROPE_THETA, tie_word_embeddings=True,
    )


def qwen3_from_state(state: dict[str, torch.Tensor], dtype: torch.dtype, where: Path) -> Any:
    from transformers import Qwen3Model
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return _on_meta_rotary(Qwen3Model, lambda m: Qwen3RotaryEmbedding(config=m.config), state, dtype, where,
                           "a Qwen3 text encoder (kohya's --qwen3)", qwen3_config(state, where))


def _tokenizer(class_name: str, folder: str | None, hub_id: str, argument: str) -> Any:
    """The tokenizer of kohya's folder argument when given, else the hub (cache) copy of what kohya bundles."""
    import transformers

    if folder is not None:  # transformers builds an empty tokenizer from a folder without one, silently
        if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES[class_name]):
            raise UserError(f"kohya's --{argument} {folder} is not a folder with a tokenizer (no "
                            f"{' / '.join(TOKENIZER_FILES[class_name])})")
    try:
        return getattr(transformers, class_name).from_pretrained(folder or hub_id)
    except (OSError, ValueError) as exc:
        where = f"kohya's --{argument} folder {folder}" if folder else f"tokenizer {hub_id}"
        raise UserError(f"{where} could not be loaded ({str(exc).splitlines()[0][:200]}); download it with "
                        f"`hf download {hub_id}` or give kohya's --{argument} as a folder with it") from None


# ---------------------------------------------------------------------------------------------- VAE
def vae_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """AutoencoderKLQwenImage's config from its shapes in diffusers' names: the encoder's flat list holds per level
    `num_res_blocks` residual blocks then a downsample (with a time_conv where it halves time too), the decoder one
    up block per level with a residual block more."""
    keys = list(state)
    base = int(state["encoder.conv_in.weight"].shape[0])
    levels = count_matching(keys, r"decoder\.up_blocks\.(\d+)\.")
    blocks = count_matching(keys, r"decoder\.up_blocks\.0\.resnets\.(\d+)\.") - 1
    step = blocks + 1  # encoder entries per level, its downsample included
    return {
        "base_dim": base,
        "z_dim": int(state["decoder.conv_in.weight"].shape[1]),
        "input_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "dim_mult": [int(state[f"encoder.down_blocks.{i * step + blocks - 1}.conv2.weight"].shape[0]) // base
                     for i in range(levels)],
        "num_res_blocks": blocks,
        "attn_scales": [],  # kohya's fixed config: no attention outside the middle blocks
        "temperal_downsample": [f"encoder.down_blocks.{i * step + blocks}.time_conv.weight" in state
                                for i in range(levels - 1)],
    }  # latents_mean / latents_std: diffusers' defaults are Qwen-Image's, the ones kohya fixes


def load_vae(path: Path, dtype: torch.dtype) -> Any:
    """kohya's --vae: the Qwen-Image VAE in diffusers' names, or ComfyUI's (Wan's, converted by diffusers)."""
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    state = read_safetensors(path)
    if "encoder.conv1.weight" in state:  # ComfyUI's layout: kohya converts it the same way
        state = convert_wan_vae_to_diffusers(state)
    needed = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.up_blocks.0.resnets.0.conv1.weight",
              "encoder.down_blocks.0.conv2.weight")
    if any(k not in state for k in needed):
        raise UserError(f"{path}: not a Qwen-Image VAE (kohya's --vae): no encoder / decoder blocks")
    try:
        config = vae_config(state)
    except KeyError as exc:
        raise UserError(f"{path}: not a Qwen-Image VAE (kohya's --vae): no tensor {exc}") from None
    return on_meta(AutoencoderKLQwenImage, state, dtype, path, **config)
