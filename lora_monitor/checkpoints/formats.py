"""LoRA key layouts of the common SD 1.x / SDXL trainers, normalised for diffusers' `load_lora_weights`.

Layouts read (facts from the trainers' save code):

- kohya (sd-scripts): `lora_unet_<module>` / `lora_te_` (SD 1.x) / `lora_te1_` + `lora_te2_` (SDXL) with
  `.lora_down.weight`, `.lora_up.weight`, `.alpha`; LoCon adds conv layers with 4-D weights. SD 1.x UNet
  names follow diffusers, SDXL's follow the original (sgm) UNet (`input_blocks_4_1_...`). ai-toolkit
  (SD/SDXL, default) and OneTrainer ("KOHYA", "LEGACY") write the same layout, SDXL with diffusers UNet
  names. diffusers reads all of these itself, so they pass through after a check.
- diffusers / peft: `unet.` / `text_encoder.` / `text_encoder_2.` + module path + `.lora_A.weight` /
  `.lora_B.weight` (diffusers' save, OneTrainer "DIFFUSERS", ai-toolkit `peft_format`), or the older
  `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.down/up` and attention-processor names
  (`attn1.processor.to_q_lora`). Keys are rewritten to the peft form with the LoRA scale alpha/rank folded
  into `lora_B`, since a state dict handed to diffusers carries no alphas (diffusers' own metadata lives
  in the file header, which the caller passes as `metadata`).
- original / ComfyUI (OneTrainer "ORIGINAL", "COMFY"): LDM UNet names such as
  `diffusion_model.input_blocks.1.1.proj_in.lora_A.weight` (ORIGINAL: without the prefix), `.alpha`,
  text encoders as `text_encoders.clip_l.transformer.`; mapped to diffusers module names here.

Refused with `NotALoraError`: LyCORIS LoHa / LoKr / OFT / Tucker (`lora_mid`) / full-weight diffs, DoRA
(diffusers' SD/SDXL loaders drop its magnitude, so images would be wrong), diffusers-named transformer-model
LoRAs (Flux, SD3: `transformer.`, `lora_transformer_`), full checkpoints, and unknown layouts. kohya's own
FLUX / SD3 / ... files use the kohya prefixes (`lora_te3_` is their T5) and pass here: the family check
(families.py) and the module check (coverage.py) judge them against the base model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from lora_monitor.checkpoints.files import NotALoraError

log = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")  # te3: FLUX/SD3 T5
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# OneTrainer bundles textual-inversion vectors for its placeholder tokens into the LoRA file
BUNDLED_EMBEDDING_PREFIX = "bundle_emb."
COMFY_TEXT_ENCODERS = {"text_encoders.clip_l.transformer.": "text_encoder",
                       "text_encoders.clip_g.transformer.": "text_encoder_2"}
SD_LAYERS_PER_BLOCK = 2  # SD 1.x, SD 2.x and SDXL alike

# (marker in a key, reason) for adapter kinds diffusers cannot load into SD 1.x / SDXL pipelines
_UNSUPPORTED = (
    (".hada_", "a LyCORIS LoHa"),
    (".lokr_", "a LyCORIS LoKr"),
    (".oft_", "a LyCORIS OFT"),
    (".oft_blocks", "a LyCORIS OFT"),
    (".lora_mid.", "a LyCORIS LoCon with Tucker decomposition (lora_mid)"),
    (".dora_scale", "a DoRA (weight-decomposed LoRA)"),
    (".magnitude", "a DoRA (weight-decomposed LoRA)"),
    (".lora_magnitude_vector", "a DoRA (weight-decomposed LoRA)"),
    ("lora_transformer_", "a LoRA for a transformer model (Flux / SD3), not SD 1.x / SDXL"),
)
_UNSUPPORTED_DETAIL = {
    "a DoRA (weight-decomposed LoRA)": "diffusers' SD/SDXL loaders drop the DoRA magnitude",
}


@dataclass(frozen=True)
class _Module:
    """One LoRA module in peft form: component ('unet', ...) and diffusers module path."""

    component: str
    path: str


def _refuse_unsupported(keys: list[str]) -> None:
    for key in keys:
        if key.endswith((".diff", ".diff_b")):
            raise NotALoraError(f"a LyCORIS full-weight difference (diffusers cannot load it; key {key!r})")
        for marker, what in _UNSUPPORTED:
            if marker in key:
                detail = _UNSUPPORTED_DETAIL.get(what, "diffusers cannot load it into SD 1.x / SDXL")
                raise NotALoraError(f"{what} ({detail}; key {key!r})")
    if any(k.startswith(("transformer.", "diffusion_model.double_blocks", "diffusion_model.joint_blocks"))
           for k in keys):
        raise NotALoraError("a LoRA for a transformer model (Flux / SD3 / ...), not SD 1.x / SDXL")


_ORIGINAL_ROOTS = ("diffusion_model.", "input_blocks.", "middle_block.", "output_blocks.")


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """'kohya', 'peft' or 'original' (LDM names); NotALoraError for anything else (the text says why)."""
    keys = [k for k in state if not k.startswith(BUNDLED_EMBEDDING_PREFIX)]
    if not keys:
        raise NotALoraError("no LoRA tensors" if state else "no tensors")
    _refuse_unsupported(keys)
    if not any("lora" in k.lower() for k in keys):
        raise NotALoraError(f"no LoRA tensors (first key: {keys[0]}); a full model or another kind of file")
    if all(k.startswith(KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(KOHYA_PREFIXES) for k in keys):
        odd = next(k for k in keys if not k.startswith(KOHYA_PREFIXES))
        raise NotALoraError(f"kohya-style LoRA with an unexpected key {odd!r}")
    if any(k.startswith(_ORIGINAL_ROOTS) for k in keys):
        return "original"
    return "peft"


# ---------------------------------------------------------------- kohya


def _check_kohya(state: dict[str, torch.Tensor]) -> None:
    """Every module has down and up weights of matching rank; no other tensors."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            downs[name] = value
        elif suffix == "lora_up.weight":
            ups[name] = value
        elif suffix != "alpha":
            raise NotALoraError(f"kohya-style LoRA with an unexpected tensor {key!r}")
    for name in downs.keys() | ups.keys():
        if name not in downs or name not in ups:
            raise NotALoraError(f"kohya-style LoRA module {name!r} lacks its lora_down or lora_up weight")
        if downs[name].shape[0] != ups[name].shape[1]:
            raise NotALoraError(f"kohya-style LoRA module {name!r}: lora_down and lora_up ranks differ")


# ---------------------------------------------------------------- peft / diffusers

# older diffusers names -> peft module path (the part before the LoRA suffix)
_OLD_ATTN = [
    (re.compile(r"\.processor\.(to_q|to_k|to_v)_lora$"), r".\1"),
    (re.compile(r"\.processor\.to_out_lora$"), ".to_out.0"),
    (re.compile(r"\.self_attn\.to_(q|k|v)_lora$"), r".self_attn.\1_proj"),
    (re.compile(r"\.self_attn\.to_out_lora$"), ".self_attn.out_proj"),
]
# (suffix, role): role 'A' = down projection, 'B' = up projection, 'Bb' = up bias, 'alpha'
_PEFT_SUFFIXES = (
    (".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "Bb"),
    (".lora.down.weight", "A"), (".lora.up.weight", "B"),
    (".lora_linear_layer.down.weight", "A"), (".lora_linear_layer.up.weight", "B"),
    (".lora_down.weight", "A"), (".lora_up.weight", "B"),
    ("_lora.down.weight", "A"), ("_lora.up.weight", "B"),  # attention processors: attn1.processor.to_q_lora
    (".alpha", "alpha"),
)
_UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "time_embedding.",
               "add_embedding.")


def _split_peft_key(key: str) -> tuple[_Module, str]:
    """('unet', module path), role — or NotALoraError for a key that fits no known peft form."""
    for suffix, suffix_role in _PEFT_SUFFIXES:
        if key.endswith(suffix):
            role = suffix_role
            stem = key[: -len(suffix)] + ("_lora" if suffix.startswith("_lora") else "")
            break
    else:
        raise NotALoraError(f"unrecognised LoRA tensor {key!r}")
    if stem.startswith("base_model.model."):  # peft's own save of a wrapped UNet
        stem = stem[len("base_model.model."):]
    for component in ("text_encoder_2", "text_encoder", "unet"):
        if stem.startswith(component + "."):
            path = stem[len(component) + 1:]
            break
    else:
        if not stem.startswith(_UNET_ROOTS):
            raise NotALoraError(f"LoRA key {key!r} names no unet./text_encoder./text_encoder_2. component")
        component, path = "unet", stem  # a bare UNet state dict (peft get_peft_model_state_dict)
    for pattern, repl in _OLD_ATTN:
        path = pattern.sub(repl, path)
    return _Module(component, path), role


def _adapter_metadata(metadata: dict[str, str] | None) -> dict[str, Any]:
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("ignoring unreadable lora_adapter_metadata in the LoRA header")
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _pattern_value(patterns: dict[str, Any], path: str) -> Any | None:
    """peft's rank/alpha_pattern lookup: a key matches a module path ending in it (regex allowed)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def _peft_scale(module: _Module, rank: int, alpha: float | None, meta: dict[str, Any]) -> float:
    """LoRA scale (alpha / rank, or alpha / sqrt(rank) with rsLoRA) that peft would apply."""
    prefix = module.component + "."
    rslora = bool(meta.get(prefix + "use_rslora", False))
    if alpha is None:
        alpha = _pattern_value(meta.get(prefix + "alpha_pattern", {}), module.path)
    if alpha is None:
        alpha = meta.get(prefix + "lora_alpha")
        if alpha is None:
            return 1.0  # no alpha anywhere: diffusers loads such files with alpha = rank
        # peft's default alpha is global; a per-module rank (rank_pattern) does not change it
    if meta.get(prefix + "use_dora"):
        raise NotALoraError("a DoRA (weight-decomposed LoRA) (diffusers' SD/SDXL loaders drop the magnitude)")
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def _normalize_peft(
    state: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> dict[str, torch.Tensor]:
    parts: dict[_Module, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, role = _split_peft_key(key)
        if role in parts.setdefault(module, {}):
            raise NotALoraError(f"LoRA module {module.component}.{module.path} appears twice ({key!r})")
        parts[module][role] = value
    meta = _adapter_metadata(metadata)
    out: dict[str, torch.Tensor] = {}
    for module, roles in parts.items():
        name = f"{module.component}.{module.path}"
        if "A" not in roles or "B" not in roles:
            raise NotALoraError(f"LoRA module {name} lacks its down (A) or up (B) weight")
        down, up = roles["A"], roles["B"]
        if down.shape[0] != up.shape[1]:
            raise NotALoraError(f"LoRA module {name}: down and up ranks differ")
        alpha = float(roles["alpha"].item()) if "alpha" in roles else None
        scale = _peft_scale(module, down.shape[0], alpha, meta)
        out[f"{name}.lora_A.weight"] = down
        # fold the scale into B: diffusers then loads with alpha = rank (scale 1), the same product
        out[f"{name}.lora_B.weight"] = up if scale == 1.0 else (up.float() * scale).to(up.dtype)
        if "Bb" in roles:
            bias = roles["Bb"]
            out[f"{name}.lora_B.bias"] = bias if scale == 1.0 else (bias.float() * scale).to(bias.dtype)
    return out


# ---------------------------------------------------------------- original (LDM / sgm) names

_RESNET_LEAVES = {"in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.3": "conv2",
                  "skip_connection": "conv_shortcut", "in_layers.0": "norm1", "out_layers.0": "norm2"}
_TOP_LEVEL = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
              "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
              "label_emb.0.2": "add_embedding.linear_2", "out.2": "conv_out", "out.0": "conv_norm_out"}


def _resnet_leaf(leaf: str, module: str) -> str:
    if leaf not in _RESNET_LEAVES:
        raise NotALoraError(f"unrecognised UNet layer {module!r} in an original-layout LoRA")
    return _RESNET_LEAVES[leaf]


def ldm_to_diffusers_unet(module: str, layers_per_block: int = SD_LAYERS_PER_BLOCK) -> str:
    """Diffusers module path of an original (LDM/sgm) SD 1.x / SDXL UNet module path.

    input_blocks.N (N >= 1) hold, per down level, `layers_per_block` (resnet, attention) pairs and then a
    downsampler; output_blocks.N hold `layers_per_block + 1` (resnet, attention, upsampler) triples per
    level; the upsampler is the only module whose leaf is a bare `conv`.
    """
    for ldm, diffusers in _TOP_LEVEL.items():
        if module == ldm:
            return diffusers
    per = layers_per_block + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.(\d+)\.(.+)", module):
        n, sub, leaf = int(m[1]), int(m[2]), m[3]
        level, j = divmod(n - 1, per)
        if j == layers_per_block and sub == 0 and leaf in ("op", "conv"):
            return f"down_blocks.{level}.downsamplers.0.conv"
        if j == layers_per_block:
            raise NotALoraError(f"unrecognised UNet layer {module!r} in an original-layout LoRA")
        if sub == 0:
            return f"down_blocks.{level}.resnets.{j}.{_resnet_leaf(leaf, module)}"
        if sub == 1:
            return f"down_blocks.{level}.attentions.{j}.{leaf}"
    if m := re.fullmatch(r"middle_block\.(\d+)\.(.+)", module):
        sub, leaf = int(m[1]), m[2]
        if sub == 1:
            return f"mid_block.attentions.0.{leaf}"
        if sub in (0, 2):
            return f"mid_block.resnets.{sub // 2}.{_resnet_leaf(leaf, module)}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.(\d+)\.(.+)", module):
        n, sub, leaf = int(m[1]), int(m[2]), m[3]
        level, j = divmod(n, per)
        if leaf == "conv":
            return f"up_blocks.{level}.upsamplers.0.conv"
        if sub == 0:
            return f"up_blocks.{level}.resnets.{j}.{_resnet_leaf(leaf, module)}"
        if sub == 1:
            return f"up_blocks.{level}.attentions.{j}.{leaf}"
    raise NotALoraError(f"unrecognised UNet layer {module!r} in an original-layout LoRA")


def _original_to_peft_keys(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Rename original-layout keys to `unet.` / `text_encoder*.` peft keys (suffixes kept)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix, component in COMFY_TEXT_ENCODERS.items():
            if key.startswith(prefix):
                out[f"{component}.{key[len(prefix):]}"] = value
                break
        else:
            body = key.removeprefix("diffusion_model.")
            for suffix, _role in _PEFT_SUFFIXES:
                if body.endswith(suffix):
                    module = ldm_to_diffusers_unet(body[: -len(suffix)], layers_per_block)
                    out[f"unet.{module}{suffix}"] = value
                    break
            else:
                raise NotALoraError(f"unrecognised LoRA tensor {key!r}")
    return out


# ---------------------------------------------------------------- public API


def normalize_lora_state(
    state: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    *,
    layers_per_block: int = SD_LAYERS_PER_BLOCK,
) -> dict[str, torch.Tensor]:
    """A state dict that diffusers' `load_lora_weights` loads fully into SD 1.x / SDXL pipelines.

    `metadata` is the safetensors header metadata (diffusers keeps its LoRA alphas there). kohya-layout
    files are returned as they are (diffusers converts them, SDXL's sgm UNet names with the pipeline's
    UNet config); other layouts come back as peft keys with alpha/rank folded into `lora_B`.
    `layers_per_block` only matters for original-layout (LDM) UNet names; real SD models use 2.
    Raises `NotALoraError` (text says why) for unsupported kinds.
    """
    layout = detect_layout(state)
    bundled = [k for k in state if k.startswith(BUNDLED_EMBEDDING_PREFIX)]
    if bundled:
        log.warning("LoRA file bundles %d textual-inversion tensors (OneTrainer bundle_emb.*): not loaded; "
                    "placeholder tokens in prompts will not use them", len(bundled))
    state = {k: v for k, v in state.items() if not k.startswith(BUNDLED_EMBEDDING_PREFIX)}
    if layout == "kohya":
        _check_kohya(state)
        return dict(state)
    if layout == "original":
        state = _original_to_peft_keys(state, layers_per_block)
    return _normalize_peft(state, metadata)


def lora_modules(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """LoRA module count per component ('unet', 'text_encoder', 'text_encoder_2') of a normalised state."""
    counts: dict[str, int] = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            prefix = next(p for p in KOHYA_PREFIXES if key.startswith(p))
            component = {"lora_unet_": "unet", "lora_te2_": "text_encoder_2"}.get(prefix, "text_encoder")
        elif key.endswith(".lora_A.weight"):
            component = key.split(".", 1)[0]
        else:
            continue
        counts[component] = counts.get(component, 0) + 1
    return counts


def injected_modules(pipe: Any, adapter_name: str) -> dict[str, int]:
    """Modules per pipeline component that carry LoRA weights of `adapter_name` (after load_lora_weights).

    Compared with `lora_modules(normalized_state)` this detects LoRA modules diffusers skipped.
    """
    from peft.tuners.lora import LoraLayer

    counts: dict[str, int] = {}
    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        n = sum(1 for m in model.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A)
        if n:
            counts[component] = n
    return counts


def verify_applied(pipe: Any, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """NotALoraError unless every LoRA module of the normalised `state` reached its layers of `pipe` (by name,
    coverage.py), naming those that did not.

    diffusers skips LoRA modules whose layer the base model lacks (a LoRA for another base) without an
    error as long as one module matches; this makes that visible.
    """
    from lora_monitor.checkpoints import coverage
    from lora_monitor.families import pipeline_family

    unet = getattr(pipe, "unet", None)
    per_block = unet.config.layers_per_block if unet is not None else SD_LAYERS_PER_BLOCK
    expected = coverage.expected_targets(state, pipeline_family(pipe), per_block)
    models = {c: m for c in COMPONENTS if (m := getattr(pipe, c, None)) is not None}
    missing = coverage.left_over(expected, coverage.adapted_targets(models, adapter_name))
    if missing:
        raise NotALoraError(f"only part of the LoRA fits this base model: {len(missing)} of {len(expected)} "
                            f"modules not applied ({coverage.name_some(missing)}); a LoRA for another base model?")


def describe_lora(state: dict[str, torch.Tensor]) -> str:
    """One line, e.g. "kohya LoRA, rank 8, 96 modules (UNet 72, text encoder 24), 12 conv (LoCon)"."""
    layout = detect_layout(state)
    norm = normalize_lora_state(state)
    counts = lora_modules(norm)
    down_keys = [k for k in norm if k.endswith((".lora_down.weight", ".lora_A.weight"))]
    ranks = sorted({int(norm[k].shape[0]) for k in down_keys})
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    names = {"unet": "UNet", "text_encoder": "text encoder", "text_encoder_2": "text encoder 2"}
    parts = ", ".join(f"{names[c]} {n}" for c, n in counts.items())
    text = f"{layout} LoRA, rank {rank}, {sum(counts.values())} modules ({parts})"
    conv = sum(1 for k in down_keys if norm[k].ndim == 4 and norm[k].shape[-1] > 1)
    if conv:
        text += f", {conv} conv 3x3 (LoCon)"
    if any(k.startswith(BUNDLED_EMBEDDING_PREFIX) for k in state):
        text += ", bundled embeddings ignored"
    return text
