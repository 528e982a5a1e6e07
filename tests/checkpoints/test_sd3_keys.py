"""kohya's SD3 LoRA (the fixture, written by kohya's own lora_sd3) applied to diffusers' SD3Transformer2DModel built
from the fixture's config: every module applied, each adapted layer's weight delta equal to scale * B @ A
computed by hand from the file (halves swapped where SD3's reference model computes (shift, scale)), and one
forward pass of the pipeline's transformer equal to the base model with those deltas added."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_monitor.checkpoints import coverage, sd3_keys
from lora_monitor.config import EvalConfig
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import lora_state as ls

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

FOLDER = Path(__file__).parent.parent / "fixtures" / "kohya-families" / "sd3"
FILE = FOLDER / "tiny-step00000004.safetensors"
INFO = json.loads((FOLDER / "model.json").read_text())
DEPTH = INFO["kohya_model"]["SD3Params"]["depth"]


def hand_split(name: str, rows: int) -> dict[str, list[slice]]:
    """diffusers layer -> row slices of kohya's up matrix (concatenated), written out from SD3's two layouts."""
    m = re.fullmatch(r"lora_unet_joint_blocks_(\d+)_(x_block|context_block)_(\w+)", name)
    assert m, name
    block, stream, leaf = f"transformer_blocks.{m[1]}", m[2], m[3]
    third, half = rows // 3, rows // 2
    if leaf == "attn_qkv":
        names = ("to_q", "to_k", "to_v") if stream == "x_block" else ("add_q_proj", "add_k_proj", "add_v_proj")
        return {f"{block}.attn.{n}": [slice(j * third, (j + 1) * third)] for j, n in enumerate(names)}
    if leaf == "adaLN_modulation_1":
        if stream == "x_block":
            return {f"{block}.norm1.linear": [slice(0, rows)]}
        if int(m[1]) == DEPTH - 1:  # the pre-only text stream: (shift, scale) -> diffusers' (scale, shift)
            return {f"{block}.norm1_context.linear": [slice(half, rows), slice(0, half)]}
        return {f"{block}.norm1_context.linear": [slice(0, rows)]}
    plain = {("x_block", "attn_proj"): "attn.to_out.0", ("context_block", "attn_proj"): "attn.to_add_out",
             ("x_block", "mlp_fc1"): "ff.net.0.proj", ("x_block", "mlp_fc2"): "ff.net.2",
             ("context_block", "mlp_fc1"): "ff_context.net.0.proj", ("context_block", "mlp_fc2"): "ff_context.net.2"}
    return {f"{block}.{plain[(stream, leaf)]}": [slice(0, rows)]}


def hand_deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    deltas = {}
    for key in state:
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            down, up = state[key].float(), state[f"{name}.lora_up.weight"].float()
            scale = state[f"{name}.alpha"].float().item() / down.shape[0]
            for path, rows in hand_split(name, up.shape[0]).items():
                deltas[path] = scale * torch.cat([up[r] for r in rows]) @ down
    return deltas


def test_every_fixture_module_maps_and_each_layer_gets_its_hand_computed_delta() -> None:
    from diffusers import SD3Transformer2DModel

    state = load_file(str(FILE))
    torch.manual_seed(0)
    model = SD3Transformer2DModel.from_config(INFO["diffusers_equivalent"]["config"])
    peft = {k: v for k, v in sd3_keys.to_diffusers(state).items() if k.startswith("transformer.")}
    model.load_lora_adapter(peft, adapter_name="t")
    expected = {k: v for k, v in coverage.expected_targets(state, "sd3").items() if k.startswith("lora_unet_")}
    adapted = coverage.adapted_targets({"transformer": model}, "t")
    assert len(expected) == 17 and coverage.left_over(expected, adapted) == []
    deltas = hand_deltas(state)
    assert len(deltas) == len(adapted) == 25  # 17 kohya modules, four fused qkv of three layers each
    layers = dict(model.named_modules())
    for path, delta in deltas.items():
        torch.testing.assert_close(layers[path].get_delta_weight("t").float(), delta, atol=1e-6, rtol=1e-5, msg=path)


@pytest.mark.parametrize(
    ("name", "rows", "cols", "paths"),
    [
        ("joint_blocks_3_x_block_attn_qkv", 4608, 1536,
         [("transformer_blocks.3.attn.to_q", ((0, 1536),)), ("transformer_blocks.3.attn.to_k", ((1536, 3072),)),
          ("transformer_blocks.3.attn.to_v", ((3072, 4608),))]),
        ("joint_blocks_0_x_block_attn2_qkv", 6, 2,
         [("transformer_blocks.0.attn2.to_q", ((0, 2),)), ("transformer_blocks.0.attn2.to_k", ((2, 4),)),
          ("transformer_blocks.0.attn2.to_v", ((4, 6),))]),
        ("joint_blocks_0_x_block_attn2_proj", 8, 8, [("transformer_blocks.0.attn2.to_out.0", ((0, 8),))]),
        ("joint_blocks_0_context_block_attn_qkv", 24, 8,
         [("transformer_blocks.0.attn.add_q_proj", ((0, 8),)), ("transformer_blocks.0.attn.add_k_proj", ((8, 16),)),
          ("transformer_blocks.0.attn.add_v_proj", ((16, 24),))]),
        ("joint_blocks_1_context_block_adaLN_modulation_1", 48, 8,  # 6 modulations: kept as they are
         [("transformer_blocks.1.norm1_context.linear", ((0, 48),))]),
        ("joint_blocks_23_context_block_adaLN_modulation_1", 16, 8,  # the pre-only block's 2: swapped
         [("transformer_blocks.23.norm1_context.linear", ((8, 16), (0, 8)))]),
        ("final_layer_adaLN_modulation_1", 16, 8, [("norm_out.linear", ((8, 16), (0, 8)))]),
        ("final_layer_linear", 64, 8, [("proj_out", ((0, 64),))]),
        ("t_embedder_mlp_2", 8, 8, [("time_text_embed.timestep_embedder.linear_2", ((0, 8),))]),
        ("y_embedder_mlp_0", 8, 64, [("time_text_embed.text_embedder.linear_1", ((0, 8),))]),
        ("x_embedder_proj", 8, 16, [("pos_embed.proj", ((0, 8),))]),
        ("context_embedder", 8, 32, [("context_embedder", ((0, 8),))]),
        ("joint_blocks_0_x_block_attn_qkv", 95, 32, None),  # not three equal parts: no guess
        ("joint_blocks_0_x_block_attn_ln_q", 64, 64, None),
    ],
)
def test_transformer_parts(name: str, rows: int, cols: int, paths: list | None) -> None:
    parts = sd3_keys.transformer_parts(name, rows, cols)
    assert (None if parts is None else [(p.path, p.rows) for p in parts]) == paths


@pytest.mark.parametrize(("module", "component", "path"), [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
     "text_model.encoder.layers.0.self_attn.q_proj"),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc2", "text_encoder_2", "text_model.encoder.layers.1.mlp.fc2"),
    ("lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_1", "text_encoder_3",
     "encoder.block.0.layer.1.DenseReluDense.wi_1"),
])
def test_text_encoder_names(module: str, component: str, path: str) -> None:
    [part] = sd3_keys.module_parts(module, torch.zeros(4, 32), torch.zeros(32, 4))
    assert (part.component, part.path) == (component, path)


def _inputs(config: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, config["in_channels"], 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, config["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([500.0]),
    }


def test_fixture_through_the_evaluator_equals_the_base_plus_the_hand_computed_delta(tmp_path: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = INFO["diffusers_equivalent"]["config"]
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel.from_config(config).eval()
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**INFO["text_encoders"][n]["CLIPTextConfig"])).eval()
                for n in ("clip_l", "clip_g")]
    base = copy.deepcopy(transformer)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=encoders[0],
                                    tokenizer=None, text_encoder_2=encoders[1], tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=transformer)
    evaluator = ev.Evaluator(pipe, [], EvalConfig(device="cpu"), tmp_path)
    assert evaluator.family == "sd3"
    state = ls.load_lora_state(FILE, evaluator.family)
    evaluator.swap_in(state)  # raises unless all 41 modules (17 transformer, 12 CLIP-L, 12 CLIP-G) reached their layers
    assert len(coverage.adapted_targets(evaluator._components(), evaluator._adapter)) == 25 + 12 + 12
    reference = copy.deepcopy(base)
    layers = dict(reference.named_modules())
    with torch.no_grad():
        for path, delta in hand_deltas(state).items():
            layers[path].weight += delta
        inputs = _inputs(config)
        want = reference(**inputs, return_dict=False)[0]
        got = pipe.transformer(**inputs, return_dict=False)[0]
        unchanged = base(**inputs, return_dict=False)[0]
    assert (want - unchanged).abs().max() > 1e-4  # the LoRA changes the output, so equality below means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    evaluator.unload()
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs, return_dict=False)[0], unchanged)
