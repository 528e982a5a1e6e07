"""What every kohya key mapping of the transformer families shares: module pairs, parts of fused layers, peft keys.

kohya names each LoRA module after the original model's layer (`lora_unet_` + the module path with `_` for `.`,
`lora_te1_`/`lora_te2_`/`lora_te3_` for the text encoders). Where the original model fuses projections
diffusers keeps apart (qkv, FLUX's linear1), one kohya module lands in several diffusers layers: the delta
B @ A of the fused layer, cut by rows, is the delta of each part, so every part keeps the whole down matrix A
and takes its rows of the up matrix B (`Part.rows`). kohya's scale alpha / rank is folded into B: diffusers
then loads the result with scale 1. Each family's module names live in its own module (flux_keys, sd3_keys,
...); `family_keys` picks the right one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

TRANSFORMER_PREFIX = "lora_unet_"
QKV = ("to_q", "to_k", "to_v")  # diffusers' attention projections of the image stream
ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")  # and of the text stream (joint attention)

# text encoder module names (underscored by kohya) -> dotted paths; the leaf attributes keep their own `_`
TEXT_ENCODER_NAMES = (
    (r"text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
     "text_model.encoder.layers.{0}.{1}.{2}"),  # CLIP
    (r"encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)",
     "encoder.block.{0}.layer.{1}.{2}.{3}"),  # T5
)


@dataclass(frozen=True)
class Part:
    """One diffusers layer a kohya module lands in: its component, module path and rows of the up matrix."""

    component: str
    path: str
    rows: tuple[tuple[int, int], ...]  # (start, stop) row ranges of the kohya up matrix, concatenated

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This part's rows of a fused layer's tensor (a LoRA up matrix, or the layer's own weight or bias)."""
        return torch.cat([tensor[start:stop] for start, stop in self.rows])


# (module name with its prefix, down, up) -> the diffusers layers it lands in; None when the name maps to none
PartsOf = Callable[[str, torch.Tensor, torch.Tensor], "list[Part] | None"]


def whole(component: str, path: str, out_rows: int) -> Part:
    return Part(component, path, ((0, out_rows),))


def split_equal(component: str, paths: tuple[str, ...], out_rows: int) -> list[Part] | None:
    """A fused layer of len(paths) equally wide outputs (qkv); None when the rows do not split evenly."""
    if out_rows % len(paths):
        return None
    width = out_rows // len(paths)
    return [Part(component, p, ((i * width, (i + 1) * width),)) for i, p in enumerate(paths)]


def qkv_and_mlp(block: str, out_rows: int, hidden: int) -> list[Part] | None:
    """A single-stream block's fused input layer (FLUX's and HunyuanImage's `linear1`): q, k, v each `hidden` rows
    (the layer's input width), the MLP input (`proj_mlp`) the rest; None when no rows are left for the MLP."""
    if out_rows <= 3 * hidden:
        return None
    parts = [Part("transformer", f"{block}.attn.{n}", ((i * hidden, (i + 1) * hidden),))
             for i, n in enumerate(QKV)]
    return [*parts, Part("transformer", f"{block}.proj_mlp", ((3 * hidden, out_rows),))]


def swapped_halves(component: str, path: str, out_rows: int) -> list[Part] | None:
    """A modulation layer computing (shift, scale) where diffusers computes (scale, shift): halves swapped."""
    if out_rows % 2:
        return None
    half = out_rows // 2
    return [Part(component, path, ((half, out_rows), (0, half)))]


def direct(table: tuple[tuple[str, str], ...], name: str, component: str, out_rows: int) -> list[Part] | None:
    """The one layer a regex table maps `name` to ({0}, {1}: the pattern's groups); None when no row matches."""
    for pattern, path in table:
        if m := re.fullmatch(pattern, name):
            return [whole(component, path.format(*m.groups()), out_rows)]
    return None


def module_parts_of(transformer_parts: Callable[[str, int, int], list[Part] | None], text_encoders: dict[str, str],
                    names: tuple[tuple[str, str], ...] = TEXT_ENCODER_NAMES) -> PartsOf:
    """A family's `module_parts`: `lora_unet_` names through its `transformer_parts(name, out_rows, in_features)`,
    text-encoder names by their prefix (`text_encoders`: kohya prefix -> pipeline component) and the `names` table."""

    def module_parts(module: str, down: torch.Tensor, up: torch.Tensor) -> list[Part] | None:
        if module.startswith(TRANSFORMER_PREFIX):
            return transformer_parts(module[len(TRANSFORMER_PREFIX):], up.shape[0], down.shape[1])
        for prefix, component in text_encoders.items():
            if module.startswith(prefix):
                return direct(names, module[len(prefix):], component, up.shape[0])
        return None

    return module_parts


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


def to_peft(state: dict[str, torch.Tensor], parts_of: PartsOf) -> dict[str, torch.Tensor]:
    """A kohya LoRA as peft keys (`transformer.<path>.lora_A.weight` ...) for the pipeline's load_lora_weights.

    Modules whose name maps to no diffusers layer are left out; the caller's check of what was applied names
    them. A conv module (SD3's patch embedding) keeps its kernel in A and its 1x1 up matrix in B, as peft does.
    """
    out: dict[str, torch.Tensor] = {}
    for name, (down, up, scale) in kohya_modules(state).items():
        for part in parts_of(name, down, up) or []:
            rows = part.take(up)
            b = rows if scale == 1.0 else (rows.float() * scale).to(up.dtype)
            out[f"{part.component}.{part.path}.lora_A.weight"] = down.contiguous()
            out[f"{part.component}.{part.path}.lora_B.weight"] = b.contiguous()
    return out
