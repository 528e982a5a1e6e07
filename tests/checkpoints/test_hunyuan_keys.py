"""kohya's HunyuanImage 2.1 LoRA (the fixture, written by kohya's own lora_hunyuan_image on kohya's double/single
block classes at hidden 64) applied to diffusers' HunyuanImageTransformer2DModel built from the fixture's config:
every module applied, each adapted layer's weight delta equal to scale * B @ A computed by hand from the file (the
fused projections cut at the widths kohya's block sizes give), and one forward pass of the transformer equal to the
base model with those deltas added."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_monitor.checkpoints import coverage, hunyuan_keys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

FOLDER = Path(__file__).parent.parent / "fixtures" / "kohya-families" / "hunyuan_image"
FILE = FOLDER / "tiny-step00000004.safetensors"
INFO = json.loads((FOLDER / "model.json").read_text())
KOHYA = INFO["kohya_model"]["block_kwargs"]
CONFIG = INFO["diffusers_equivalent"]["config"]


def hand_split(name: str, rows: int) -> dict[str, list[slice]]:
    """diffusers layer -> row slices of kohya's up matrix, written out from kohya's block sizes."""
    hidden = KOHYA["hidden_size"]
    mlp = int(hidden * KOHYA["mlp_width_ratio"])
    if m := re.fullmatch(r"lora_unet_double_blocks_(\d+)_(img|txt)_(\w+)", name):
        block, stream, leaf = f"transformer_blocks.{m[1]}", m[2], m[3]
        if leaf == "attn_qkv":
            assert rows == 3 * hidden
            names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
            return {f"{block}.attn.{n}": [slice(j * hidden, (j + 1) * hidden)] for j, n in enumerate(names)}
        plain = {("img", "attn_proj"): "attn.to_out.0", ("txt", "attn_proj"): "attn.to_add_out",
                 ("img", "mlp_fc1"): "ff.net.0.proj", ("img", "mlp_fc2"): "ff.net.2",
                 ("txt", "mlp_fc1"): "ff_context.net.0.proj", ("txt", "mlp_fc2"): "ff_context.net.2",
                 # (shift, scale, gate) x 2 in kohya's ModulateDiT and in AdaLayerNormZero: no swap
                 ("img", "mod_linear"): "norm1.linear", ("txt", "mod_linear"): "norm1_context.linear"}
        return {f"{block}.{plain[(stream, leaf)]}": [slice(0, rows)]}
    m = re.fullmatch(r"lora_unet_single_blocks_(\d+)_(\w+)", name)
    assert m, name
    block, leaf = f"single_transformer_blocks.{m[1]}", m[2]
    if leaf == "linear1":  # q, k, v, then the MLP input
        assert rows == 3 * hidden + mlp
        return {f"{block}.attn.to_q": [slice(0, hidden)], f"{block}.attn.to_k": [slice(hidden, 2 * hidden)],
                f"{block}.attn.to_v": [slice(2 * hidden, 3 * hidden)], f"{block}.proj_mlp": [slice(3 * hidden, rows)]}
    plain = {"linear2": "proj_out", "modulation_linear": "norm.linear"}  # (shift, scale, gate) in both
    return {f"{block}.{plain[leaf]}": [slice(0, rows)]}


def hand_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    deltas = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            down, up = state[key].float(), state[f"{name}.lora_up.weight"].float()
            scale = state[f"{name}.alpha"].float().item() / down.shape[0]
            for path, rows in hand_split(name, up.shape[0]).items():
                deltas[path] = scale * torch.cat([up[r] for r in rows]) @ down
    return deltas


def _base() -> torch.nn.Module:
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(0)
    return HunyuanImageTransformer2DModel.from_config(CONFIG).eval()


def _with_lora(base: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = copy.deepcopy(base)
    model.load_lora_adapter(hunyuan_keys.to_diffusers(state), prefix="transformer", adapter_name="t")
    return model


def test_every_fixture_module_maps_and_each_layer_gets_its_hand_computed_delta() -> None:
    state = load_file(str(FILE))
    model = _with_lora(_base(), state)
    modules = {k.split(".")[0] for k in state if k.endswith(".lora_down.weight")}
    assert len(modules) == 13  # 10 of the double block, 3 of the single block
    expected = {}
    for name in modules:
        parts = hunyuan_keys.module_parts(name, state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"])
        assert parts, name
        expected[name] = tuple(("transformer", p.path.replace(".", "_")) for p in parts)
    adapted = coverage.adapted_targets({"transformer": model}, "t")
    assert coverage.left_over(expected, adapted) == []
    deltas = hand_deltas(state)
    assert len(deltas) == len(adapted) == 20  # 13 kohya modules: two qkv of three layers each, linear1 of four
    assert {("transformer", p.replace(".", "_")) for p in deltas} == adapted
    layers = dict(model.named_modules())
    for path, delta in deltas.items():
        torch.testing.assert_close(layers[path].get_delta_weight("t").float(), delta, atol=1e-6, rtol=1e-5, msg=path)


@pytest.mark.parametrize(
    ("name", "rows", "cols", "paths"),
    [
        ("double_blocks_19_img_attn_qkv", 10752, 3584,  # HunyuanImage 2.1's real width
         [("transformer_blocks.19.attn.to_q", ((0, 3584),)), ("transformer_blocks.19.attn.to_k", ((3584, 7168),)),
          ("transformer_blocks.19.attn.to_v", ((7168, 10752),))]),
        ("double_blocks_0_txt_attn_qkv", 6, 2,
         [("transformer_blocks.0.attn.add_q_proj", ((0, 2),)), ("transformer_blocks.0.attn.add_k_proj", ((2, 4),)),
          ("transformer_blocks.0.attn.add_v_proj", ((4, 6),))]),
        ("single_blocks_39_linear1", 25088, 3584,
         [("single_transformer_blocks.39.attn.to_q", ((0, 3584),)),
          ("single_transformer_blocks.39.attn.to_k", ((3584, 7168),)),
          ("single_transformer_blocks.39.attn.to_v", ((7168, 10752),)),
          ("single_transformer_blocks.39.proj_mlp", ((10752, 25088),))]),
        ("single_blocks_0_linear1", 20, 4,  # a pruned MLP (ratio 2) splits from the shapes too
         [("single_transformer_blocks.0.attn.to_q", ((0, 4),)), ("single_transformer_blocks.0.attn.to_k", ((4, 8),)),
          ("single_transformer_blocks.0.attn.to_v", ((8, 12),)),
          ("single_transformer_blocks.0.proj_mlp", ((12, 20),))]),
        ("single_blocks_2_linear2", 8, 40, [("single_transformer_blocks.2.proj_out", ((0, 8),))]),
        ("single_blocks_2_modulation_linear", 24, 8, [("single_transformer_blocks.2.norm.linear", ((0, 24),))]),
        ("double_blocks_3_img_mod_linear", 48, 8, [("transformer_blocks.3.norm1.linear", ((0, 48),))]),
        ("double_blocks_3_txt_mod_linear", 48, 8, [("transformer_blocks.3.norm1_context.linear", ((0, 48),))]),
        ("double_blocks_1_img_attn_proj", 8, 8, [("transformer_blocks.1.attn.to_out.0", ((0, 8),))]),
        ("double_blocks_1_txt_attn_proj", 8, 8, [("transformer_blocks.1.attn.to_add_out", ((0, 8),))]),
        ("double_blocks_1_img_mlp_fc1", 32, 8, [("transformer_blocks.1.ff.net.0.proj", ((0, 32),))]),
        ("double_blocks_1_img_mlp_fc2", 8, 32, [("transformer_blocks.1.ff.net.2", ((0, 8),))]),
        ("double_blocks_1_txt_mlp_fc1", 32, 8, [("transformer_blocks.1.ff_context.net.0.proj", ((0, 32),))]),
        ("double_blocks_1_txt_mlp_fc2", 8, 32, [("transformer_blocks.1.ff_context.net.2", ((0, 8),))]),
        ("double_blocks_0_img_attn_qkv", 95, 32, None),  # not three equal parts: no guess
        ("single_blocks_0_linear1", 12, 4, None),  # no room for an MLP input: not a linear1 of this layout
        ("final_layer_linear", 64, 8, None),  # kohya trains no layer outside the blocks
        ("double_blocks_0_img_attn_q_norm", 64, 64, None),
    ],
)
def test_transformer_parts(name: str, rows: int, cols: int, paths: list | None) -> None:
    parts = hunyuan_keys.transformer_parts(name, rows, cols)
    assert (None if parts is None else [(p.path, p.rows) for p in parts]) == paths


def test_names_outside_the_dit_map_to_none() -> None:
    assert hunyuan_keys.module_parts("lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                     torch.zeros(4, 8), torch.zeros(8, 4)) is None


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, CONFIG["in_channels"], 4, 4, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 5, CONFIG["text_embed_dim"], generator=g),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0]]),  # one padded token, as the pipeline sends
    }


def test_transformer_with_the_lora_equals_the_base_plus_the_hand_computed_deltas() -> None:
    state = load_file(str(FILE))
    base = _base()
    model = _with_lora(base, state)
    reference = copy.deepcopy(base)
    layers = dict(reference.named_modules())
    with torch.no_grad():
        for path, delta in hand_deltas(state).items():
            layers[path].weight += delta
        inputs = _inputs()
        want = reference(**inputs, return_dict=False)[0]
        got = model(**inputs, return_dict=False)[0]
        unchanged = base(**inputs, return_dict=False)[0]
    assert (want - unchanged).abs().max() > 1e-4  # the LoRA changes the output, so equality below means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        model.disable_adapters()  # adapter off: the base model's output again
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], unchanged)
