"""kohya FLUX.1 LoRAs (the fixtures, written by kohya's own lora_flux) applied to diffusers' FluxTransformer2DModel
built from the fixture's config: every module applied, each adapted layer's weight equal to W + scale * B @ A
computed by hand from the file, and one forward pass equal to the base model with those weights merged."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_monitor.checkpoints import coverage, flux_keys
from lora_monitor.config import EvalConfig
from lora_monitor.errors import EvalError
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import lora_state as ls

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "kohya-families"


def hand_split(name: str, rows: int, hidden: int) -> dict[str, slice]:
    """The diffusers layers (and up-matrix rows) of a kohya FLUX transformer module, written out by hand."""
    m = re.fullmatch(r"lora_unet_(double|single)_blocks_(\d+)_(\w+)", name)
    assert m, name
    kind, i, leaf = m[1], m[2], m[3]
    if kind == "double":
        block = f"transformer_blocks.{i}"
        qkv = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
        if leaf in qkv:
            third = rows // 3
            return {f"{block}.{p}": slice(j * third, (j + 1) * third) for j, p in enumerate(qkv[leaf])}
        plain = {"img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out", "img_mlp_0": "ff.net.0.proj",
                 "img_mlp_2": "ff.net.2", "txt_mlp_0": "ff_context.net.0.proj", "txt_mlp_2": "ff_context.net.2",
                 "img_mod_lin": "norm1.linear", "txt_mod_lin": "norm1_context.linear"}
        return {f"{block}.{plain[leaf]}": slice(0, rows)}
    block = f"single_transformer_blocks.{i}"
    if leaf == "linear1":
        parts = ("attn.to_q", "attn.to_k", "attn.to_v")
        split = {f"{block}.{p}": slice(j * hidden, (j + 1) * hidden) for j, p in enumerate(parts)}
        return {**split, f"{block}.proj_mlp": slice(3 * hidden, rows)}
    return {f"{block}.{ {'linear2': 'proj_out', 'modulation_lin': 'norm.linear'}[leaf]}": slice(0, rows)}


def hand_deltas(state: dict[str, torch.Tensor], hidden: int) -> dict[str, torch.Tensor]:
    """diffusers layer path -> scale * B @ A (rows of the fused B where kohya fused layers), float32."""
    deltas = {}
    for key in state:
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            down, up = state[key].float(), state[f"{name}.lora_up.weight"].float()
            scale = state[f"{name}.alpha"].float().item() / down.shape[0]
            full = scale * up @ down
            for path, rows in hand_split(name, up.shape[0], hidden).items():
                deltas[path] = full[rows]
    return deltas


def _model_json(folder: str) -> dict:
    return json.loads((FIXTURES / folder / "model.json").read_text())


def _transformer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in flux_keys.to_diffusers(state).items() if k.startswith("transformer.")}


@pytest.mark.parametrize("folder", ["flux", "flux-fullwidth"])
def test_every_fixture_module_maps_and_each_layer_gets_its_hand_computed_delta(folder: str) -> None:
    from diffusers import FluxTransformer2DModel

    info = _model_json(folder)
    hidden = info["kohya_model"]["FluxParams"]["hidden_size"]
    state = load_file(str(FIXTURES / folder / "tiny-step00000004.safetensors"))
    with torch.device("meta"):  # full width (3072) is 2 GB of weights; a LoRA's deltas need none of them
        model = FluxTransformer2DModel.from_config(info["diffusers_equivalent"]["config"])
    model = model.to_empty(device="cpu")
    model.load_lora_adapter(_transformer_state(state), adapter_name="t")
    expected = {k: v for k, v in coverage.expected_targets(state, "flux").items() if k.startswith("lora_unet_")}
    adapted = coverage.adapted_targets({"transformer": model}, "t")
    assert len(expected) == 13 and coverage.left_over(expected, adapted) == []
    deltas = hand_deltas(state, hidden)
    assert len(deltas) == len(adapted) == 20  # 13 kohya modules: two fused qkv (x3) and linear1 (x4)
    layers = dict(model.named_modules())
    tol = {"atol": 1e-3, "rtol": 1e-2} if folder == "flux-fullwidth" else {"atol": 1e-6, "rtol": 1e-5}  # bf16 file
    for path, delta in deltas.items():
        torch.testing.assert_close(layers[path].get_delta_weight("t").float(), delta, **tol, msg=path)


def _inputs(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image, text = 16, 5
    return {
        "hidden_states": torch.randn(1, image, config["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(1, text, config["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(1, config["pooled_projection_dim"], generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.stack([torch.zeros(image), torch.arange(image) // 4, torch.arange(image) % 4], -1).float(),
        "txt_ids": torch.zeros(text, 3),
    }


@pytest.fixture(scope="module")
def tiny_flux() -> dict:
    """The fixture's tiny FLUX (hidden 32) as a FluxPipeline with random weights and its CLIP-L."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    info = _model_json("flux")
    config = info["diffusers_equivalent"]["config"]
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel.from_config(config).eval()
    clip = CLIPTextModel(CLIPTextConfig(**info["text_encoders"]["clip_l"]["CLIPTextConfig"])).eval()
    base = copy.deepcopy(transformer)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=clip, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    state = load_file(str(FIXTURES / "flux" / "tiny-step00000004.safetensors"))
    return {"pipe": pipe, "base": base, "config": config, "state": state, "hidden": 32}


def test_fixture_through_the_evaluator_equals_the_base_plus_the_hand_computed_delta(
    tiny_flux: dict, tmp_path: Path
) -> None:
    pipe, base, config = tiny_flux["pipe"], tiny_flux["base"], tiny_flux["config"]
    evaluator = ev.Evaluator(pipe, [], EvalConfig(device="cpu"), tmp_path)
    assert evaluator.family == "flux"
    state = ls.load_lora_state(FIXTURES / "flux" / "tiny-step00000004.safetensors", evaluator.family)
    evaluator.swap_in(state)  # raises unless all 25 modules (13 transformer, 12 CLIP-L) reached their layers
    adapted = coverage.adapted_targets(evaluator._components(), evaluator._adapter)
    assert len(adapted) == 20 + 12
    reference = copy.deepcopy(base)
    layers = dict(reference.named_modules())
    with torch.no_grad():
        for path, delta in hand_deltas(state, tiny_flux["hidden"]).items():
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


def test_an_extra_module_fails_although_the_layer_count_would_pass(tiny_flux: dict, tmp_path: Path) -> None:
    """13 kohya modules become 20 layers: a count (found >= expected) misses a module that reached nothing."""
    evaluator = ev.Evaluator(tiny_flux["pipe"], [], EvalConfig(device="cpu"), tmp_path)
    state = dict(tiny_flux["state"])
    for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
        state["lora_unet_double_blocks_0_img_attn_norm" + suffix] = state["lora_unet_double_blocks_0_img_attn_proj"
                                                                            + suffix]
    with pytest.raises(EvalError, match=r"1 of its 26 LoRA modules .*\(lora_unet_double_blocks_0_img_attn_norm\)"):
        evaluator.swap_in(state)
    assert evaluator._adapter is None


@pytest.mark.parametrize(
    ("name", "rows", "cols", "paths"),
    [
        ("double_blocks_3_img_attn_qkv", 9216, 3072,
         [("transformer_blocks.3.attn.to_q", ((0, 3072),)), ("transformer_blocks.3.attn.to_k", ((3072, 6144),)),
          ("transformer_blocks.3.attn.to_v", ((6144, 9216),))]),
        ("single_blocks_0_linear1", 224, 32,
         [("single_transformer_blocks.0.attn.to_q", ((0, 32),)), ("single_transformer_blocks.0.attn.to_k", ((32, 64),)),
          ("single_transformer_blocks.0.attn.to_v", ((64, 96),)),
          ("single_transformer_blocks.0.proj_mlp", ((96, 224),))]),
        ("final_layer_adaLN_modulation_1", 64, 32, [("norm_out.linear", ((32, 64), (0, 32)))]),
        ("img_in", 32, 16, [("x_embedder", ((0, 32),))]),
        ("double_blocks_0_img_attn_qkv", 95, 32, None),  # not three equal parts: no guess
        ("double_blocks_0_img_attn_norm_query_norm", 16, 16, None),
    ],
)
def test_transformer_parts(name: str, rows: int, cols: int, paths: list | None) -> None:
    parts = flux_keys.transformer_parts(name, rows, cols)
    assert (None if parts is None else [(p.path, p.rows) for p in parts]) == paths


def test_t5_and_clip_names_map_to_their_modules() -> None:
    t5 = flux_keys.module_parts("lora_te3_encoder_block_2_layer_1_DenseReluDense_wi_0", torch.zeros(4, 32),
                                torch.zeros(64, 4))[0]
    clip = flux_keys.module_parts("lora_te1_text_model_encoder_layers_0_self_attn_out_proj", torch.zeros(4, 32),
                                  torch.zeros(32, 4))[0]
    assert (t5.component, t5.path) == ("text_encoder_2", "encoder.block.2.layer.1.DenseReluDense.wi_0")
    assert (clip.component, clip.path) == ("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj")
