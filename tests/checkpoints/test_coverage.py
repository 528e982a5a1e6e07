"""Which modules of a LoRA file must reach which layers (by name), and what counts as left over."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_monitor.checkpoints import coverage
from lora_monitor.checkpoints.formats import normalize_lora_state

FIXTURES = Path(__file__).parent.parent / "fixtures" / "kohya-families"


def _kohya(*names: str, rows: int = 8, cols: int = 8) -> dict[str, torch.Tensor]:
    state = {}
    for name in names:
        state[f"{name}.lora_down.weight"] = torch.ones(4, cols)
        state[f"{name}.lora_up.weight"] = torch.ones(rows, 4)
        state[f"{name}.alpha"] = torch.tensor(1.0)
    return state


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("input_blocks_4_1_transformer_blocks_0_attn1_to_q",
         "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"),
        ("input_blocks_1_0_in_layers_2", "down_blocks_0_resnets_0_conv1"),
        ("input_blocks_1_0_emb_layers_1", "down_blocks_0_resnets_0_time_emb_proj"),
        ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
        ("middle_block_1_proj_in", "mid_block_attentions_0_proj_in"),
        ("middle_block_2_out_layers_3", "mid_block_resnets_1_conv2"),
        ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
        ("output_blocks_5_1_transformer_blocks_1_ff_net_2", "up_blocks_1_attentions_2_transformer_blocks_1_ff_net_2"),
        ("time_embed_0", "time_embedding_linear_1"),
        ("mid_block_attentions_0_proj_in", "mid_block_attentions_0_proj_in"),  # diffusers names pass through
        ("input_blocks_3_7_proj_in", "input_blocks_3_7_proj_in"),  # no such layer: unchanged, so never matched
    ],
)
def test_sgm_unet_names_map_to_diffusers_layers(name: str, target: str) -> None:
    assert coverage.sgm_unet_target(name) == target


def test_sd1_fixture_modules_and_their_layers() -> None:
    state = normalize_lora_state(load_file(str(FIXTURES / "sd1" / "tiny-step00000004.safetensors")))
    expected = coverage.expected_targets(state, "sd")
    assert len(expected) == 24  # 12 UNet mid-block modules + 12 CLIP modules, one layer each
    assert expected["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"] == (
        ("unet", "mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"),)
    assert expected["lora_te_text_model_encoder_layers_1_mlp_fc2"] == (
        ("text_encoder", "encoder_layers_1_mlp_fc2"),)


@pytest.mark.parametrize(
    ("state", "family", "expected"),
    [
        (_kohya("lora_te2_text_model_encoder_layers_0_mlp_fc1"), "sdxl",
         {"lora_te2_text_model_encoder_layers_0_mlp_fc1": (("text_encoder_2", "encoder_layers_0_mlp_fc1"),)}),
        (_kohya("lora_te1_text_model_encoder_layers_0_mlp_fc1"), "sdxl",
         {"lora_te1_text_model_encoder_layers_0_mlp_fc1": (("text_encoder", "encoder_layers_0_mlp_fc1"),)}),
        ({"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(4, 8),
          "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(8, 4)}, "sd",
         {"unet.mid_block.attentions.0.proj_in": (("unet", "mid_block_attentions_0_proj_in"),)}),
        (_kohya("lora_xx_something"), "sd", {"lora_xx_something": (("?", "lora_xx_something"),)}),
        # FLUX: one fused qkv module must reach three layers, and an unknown name reaches none
        (_kohya("lora_unet_double_blocks_0_txt_attn_qkv", rows=24), "flux",
         {"lora_unet_double_blocks_0_txt_attn_qkv": (
             ("transformer", "transformer_blocks_0_attn_add_q_proj"),
             ("transformer", "transformer_blocks_0_attn_add_k_proj"),
             ("transformer", "transformer_blocks_0_attn_add_v_proj"))}),
        (_kohya("lora_unet_double_blocks_0_no_such"), "flux",
         {"lora_unet_double_blocks_0_no_such": (("?", "lora_unet_double_blocks_0_no_such"),)}),
    ],
)
def test_expected_targets(state: dict, family: str, expected: dict) -> None:
    assert coverage.expected_targets(state, family) == expected


def test_a_fused_module_is_applied_only_when_all_its_layers_are() -> None:
    expected = coverage.expected_targets(_kohya("lora_unet_double_blocks_0_img_attn_qkv", rows=24), "flux")
    q, k, v = expected["lora_unet_double_blocks_0_img_attn_qkv"]
    assert coverage.left_over(expected, {q, k, v}) == []
    assert coverage.left_over(expected, {q, k}) == ["lora_unet_double_blocks_0_img_attn_qkv"]


@pytest.mark.parametrize(
    ("names", "text"),
    [
        (["a"], "a"),
        (["a", "b", "c", "d", "e"], "a, b, c, d, e"),
        ([f"m{i}" for i in range(12)], "m0, m1, m2, m3, m4 and 7 more"),
    ],
)
def test_name_some(names: list[str], text: str) -> None:
    assert coverage.name_some(names) == text
