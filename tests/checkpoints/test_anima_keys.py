"""kohya's Anima LoRA (the fixture, written by kohya's own lora_anima) applied to diffusers' CosmosTransformer3DModel
and a Qwen3Model built from the fixture's configs: every module applied, each adapted layer's weight delta equal to
scale * B @ A computed by hand from the file, and forward passes equal to the base models with those deltas added.
The modules kohya writes only when asked (modulations, embedders and final layer through `include_patterns`, the LLM
adapter through `train_llm_adapter=true`) are checked the same way on a file made with the shapes kohya's tiny
model gives them."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_monitor.checkpoints import anima_keys, coverage
from lora_monitor.evaluation import lora_attach

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

FOLDER = Path(__file__).parent.parent / "fixtures" / "kohya-families" / "anima"
FILE = FOLDER / "tiny-step00000004.safetensors"
INFO = json.loads((FOLDER / "model.json").read_text())
KOHYA = INFO["kohya_model"]["kwargs"]
CONFIG = INFO["diffusers_equivalent"]["config"]
QWEN3 = INFO["text_encoders"]["qwen3"]["Qwen3Config"]
# a tiny LLM adapter (kohya's LLMAdapter / diffusers' AnimaTextConditioner): Qwen3 width in, the DiT's text width out
ADAPTER = {"source_dim": QWEN3["hidden_size"], "target_dim": CONFIG["text_embed_dim"], "model_dim": 32,
           "num_layers": 1, "num_attention_heads": 2, "target_vocab_size": 64}


def hand_split(name: str) -> tuple[str, str]:
    """(component, diffusers layer) of a kohya module, written out from Anima's and Cosmos' layer names."""
    if m := re.fullmatch(r"lora_te_layers_(\d+)_(self_attn|mlp)_(\w+)", name):
        return "text_encoder", f"layers.{m[1]}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"lora_unet_llm_adapter_blocks_(\d+)_(self_attn|cross_attn)_(\w+)", name):
        return "text_conditioner", f"blocks.{m[1]}.{m[2]}.{m[3]}"
    if m := re.fullmatch(r"lora_unet_llm_adapter_blocks_(\d+)_mlp_(\d)", name):
        return "text_conditioner", f"blocks.{m[1]}.mlp.{m[2]}"
    top = {"final_layer_linear": "proj_out", "final_layer_adaln_modulation_1": "norm_out.linear_1",
           "final_layer_adaln_modulation_2": "norm_out.linear_2", "x_embedder_proj_1": "patch_embed.proj",
           "t_embedder_1_linear_1": "time_embed.t_embedder.linear_1",
           "t_embedder_1_linear_2": "time_embed.t_embedder.linear_2"}
    if (short := name.removeprefix("lora_unet_")) in top:
        return "transformer", top[short]
    m = re.fullmatch(r"lora_unet_blocks_(\d+)_(\w+)", name)
    assert m, name
    leaf = {"self_attn_q_proj": "attn1.to_q", "self_attn_k_proj": "attn1.to_k", "self_attn_v_proj": "attn1.to_v",
            "self_attn_output_proj": "attn1.to_out.0", "cross_attn_q_proj": "attn2.to_q",
            "cross_attn_k_proj": "attn2.to_k", "cross_attn_v_proj": "attn2.to_v",
            "cross_attn_output_proj": "attn2.to_out.0", "mlp_layer1": "ff.net.0.proj", "mlp_layer2": "ff.net.2",
            # (shift, scale, gate) in both models: the whole layer, rows in place
            "adaln_modulation_self_attn_1": "norm1.linear_1", "adaln_modulation_self_attn_2": "norm1.linear_2",
            "adaln_modulation_cross_attn_1": "norm2.linear_1", "adaln_modulation_cross_attn_2": "norm2.linear_2",
            "adaln_modulation_mlp_1": "norm3.linear_1", "adaln_modulation_mlp_2": "norm3.linear_2"}[m[2]]
    return "transformer", f"transformer_blocks.{m[1]}.{leaf}"


def hand_deltas(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    deltas = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            where, path = hand_split(name)
            if where == component:
                down, up = state[key].float(), state[f"{name}.lora_up.weight"].float()
                deltas[path] = state[f"{name}.alpha"].float().item() / down.shape[0] * up @ down
    return deltas


def expected_targets(state: dict[str, torch.Tensor]) -> dict[str, tuple[coverage.Target, ...]]:
    """File module -> (component, underscored path) of each layer anima_keys maps it to."""
    out = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            parts = anima_keys.module_parts(name, state[key], state[f"{name}.lora_up.weight"]) or []
            out[name] = tuple((p.component, p.path.replace(".", "_")) for p in parts) or (("?", name),)
    return out


def make_transformer():
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    model = CosmosTransformer3DModel.from_config(CONFIG).eval()
    with torch.no_grad():  # diffusers initialises some layers to zero; random weights make every delta show
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def make_text_encoder():
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(1)
    return Qwen3Model(Qwen3Config(**QWEN3)).eval()


def make_text_conditioner():
    from diffusers import AnimaTextConditioner

    torch.manual_seed(2)
    return AnimaTextConditioner(**ADAPTER).eval()


def peft_of(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """`component`'s peft keys, its prefix kept (diffusers' load_lora_adapter(prefix=component) takes them so)."""
    return {k: v for k, v in anima_keys.to_diffusers(state).items() if k.startswith(f"{component}.")}


def _transformer_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, CONFIG["in_channels"], 1, 8, 8, generator=g),
        "timestep": torch.tensor([0.4]),
        "encoder_hidden_states": torch.randn(1, 6, CONFIG["text_embed_dim"], generator=g),
        "padding_mask": torch.zeros(1, 1, 8, 8),
    }


def _check_transformer(state: dict[str, torch.Tensor], modules: int) -> None:
    """Every `lora_unet_` module reaches its layer with the hand-computed delta; the forward pass is the base's with
    those deltas added."""
    transformer = make_transformer()
    base = copy.deepcopy(transformer)
    transformer.load_lora_adapter(peft_of(state, "transformer"), prefix="transformer", adapter_name="t")
    expected = {k: v for k, v in expected_targets(state).items() if v[0][0] == "transformer"}
    adapted = coverage.adapted_targets({"transformer": transformer}, "t")
    assert len(expected) == len(adapted) == modules and coverage.left_over(expected, adapted) == []
    deltas = hand_deltas(state, "transformer")
    layers = dict(transformer.named_modules())
    for path, delta in deltas.items():
        torch.testing.assert_close(layers[path].get_delta_weight("t").float(), delta, atol=1e-6, rtol=1e-5, msg=path)
    reference = copy.deepcopy(base)
    ref_layers = dict(reference.named_modules())
    with torch.no_grad():
        for path, delta in deltas.items():
            ref_layers[path].weight += delta
        inputs = _transformer_inputs()
        want = reference(**inputs, return_dict=False)[0]
        got = transformer(**inputs, return_dict=False)[0]
        unchanged = base(**inputs, return_dict=False)[0]
    assert (want - unchanged).abs().max() > 1e-4  # the LoRA changes the output, so equality below means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_every_fixture_transformer_module_maps_and_gets_its_hand_computed_delta() -> None:
    _check_transformer(load_file(str(FILE)), modules=10)


def test_the_qwen3_modules_reach_the_text_encoder_with_their_hand_computed_deltas() -> None:
    state = load_file(str(FILE))
    text_encoder = make_text_encoder()
    base = copy.deepcopy(text_encoder)
    peft = {k.removeprefix("text_encoder."): v for k, v in peft_of(state, "text_encoder").items()}
    lora_attach.attach(text_encoder, peft, "a")
    expected = {k: v for k, v in expected_targets(state).items() if k.startswith("lora_te_")}
    adapted = coverage.adapted_targets({"text_encoder": text_encoder}, "a")
    assert len(expected) == len(adapted) == 14 and coverage.left_over(expected, adapted) == []
    deltas = hand_deltas(state, "text_encoder")
    layers = dict(text_encoder.named_modules())
    for path, delta in deltas.items():
        torch.testing.assert_close(layers[path].get_delta_weight("a").float(), delta, atol=1e-6, rtol=1e-5, msg=path)
    reference = copy.deepcopy(base)
    ref_layers = dict(reference.named_modules())
    ids = torch.tensor([[2, 17, 301, 45, 999, 1]])
    with torch.no_grad():
        for path, delta in deltas.items():
            ref_layers[path].weight += delta
        want = reference(input_ids=ids).last_hidden_state
        got = text_encoder(input_ids=ids).last_hidden_state
        unchanged = base(input_ids=ids).last_hidden_state
    assert (want - unchanged).abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    lora_attach.detach(text_encoder, "a")
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(input_ids=ids).last_hidden_state, unchanged)


def _optional_modules() -> dict[str, tuple[int, int]]:
    """kohya module -> (out, in) of the Linears the default exclude pattern leaves out, and of the LLM adapter's
    blocks, in kohya's tiny Anima (library/anima_models.py with model.json's kwargs) and a tiny adapter."""
    hidden, lora = KOHYA["model_channels"], KOHYA["adaln_lora_dim"]
    patch_in = (KOHYA["in_channels"] + 1) * KOHYA["patch_spatial"] ** 2 * KOHYA["patch_temporal"]  # + padding mask
    out = {f"blocks_0_adaln_modulation_{k}_{i}": shape for k in ("self_attn", "cross_attn", "mlp")
           for i, shape in ((1, (lora, hidden)), (2, (3 * hidden, lora)))}
    out |= {"final_layer_adaln_modulation_1": (lora, hidden), "final_layer_adaln_modulation_2": (2 * hidden, lora),
            "final_layer_linear": (KOHYA["out_channels"] * KOHYA["patch_spatial"] ** 2, hidden),
            "x_embedder_proj_1": (hidden, patch_in), "t_embedder_1_linear_1": (hidden, hidden),
            "t_embedder_1_linear_2": (3 * hidden, hidden)}
    model, source = ADAPTER["model_dim"], ADAPTER["source_dim"]
    for attn, kv_in in (("self_attn", model), ("cross_attn", source)):
        out |= {f"llm_adapter_blocks_0_{attn}_{p}": (model, kv_in if p in ("k_proj", "v_proj") else model)
                for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    out |= {"llm_adapter_blocks_0_mlp_0": (4 * model, model), "llm_adapter_blocks_0_mlp_2": (model, 4 * model)}
    return {f"lora_unet_{k}": v for k, v in out.items()}


def _optional_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, (rows, cols) in _optional_modules().items():
        state[f"{name}.lora_down.weight"] = torch.randn(4, cols, generator=g) * 0.3
        state[f"{name}.lora_up.weight"] = torch.randn(rows, 4, generator=g) * 0.3
        state[f"{name}.alpha"] = torch.tensor(2.0)
    return state


def test_modulations_embedders_and_final_layer_map_when_kohya_is_told_to_train_them() -> None:
    state = {k: v for k, v in _optional_state().items() if "llm_adapter" not in k}
    _check_transformer(state, modules=12)


def test_llm_adapter_modules_reach_the_text_conditioner() -> None:
    state = {k: v for k, v in _optional_state().items() if "llm_adapter" in k}
    conditioner = make_text_conditioner()
    base = copy.deepcopy(conditioner)
    conditioner.load_lora_adapter(peft_of(state, "text_conditioner"), prefix="text_conditioner", adapter_name="c")
    expected = expected_targets(state)
    adapted = coverage.adapted_targets({"text_conditioner": conditioner}, "c")
    assert len(expected) == len(adapted) == 10 and coverage.left_over(expected, adapted) == []
    deltas = hand_deltas(state, "text_conditioner")
    reference = copy.deepcopy(base)
    ref_layers = dict(reference.named_modules())
    g = torch.Generator().manual_seed(0)
    inputs = {"source_hidden_states": torch.randn(1, 5, ADAPTER["source_dim"], generator=g),
              "target_input_ids": torch.tensor([[3, 9, 27, 1]])}
    with torch.no_grad():
        for path, delta in deltas.items():
            ref_layers[path].weight += delta
        want, got, unchanged = reference(**inputs), conditioner(**inputs), base(**inputs)
    assert (want - unchanged).abs().max() > 1e-4
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _block(i: int, leaf: str) -> str:
    return f"transformer_blocks.{i}.{leaf}"


@pytest.mark.parametrize(
    ("name", "rows", "cols", "parts"),
    [
        # real Anima: hidden 2048, 16 heads, text width 1024, adaLN-LoRA 256
        ("blocks_27_self_attn_q_proj", 2048, 2048, [("transformer", _block(27, "attn1.to_q"))]),
        ("blocks_3_self_attn_output_proj", 2048, 2048, [("transformer", _block(3, "attn1.to_out.0"))]),
        ("blocks_0_cross_attn_k_proj", 2048, 1024, [("transformer", _block(0, "attn2.to_k"))]),
        ("blocks_0_cross_attn_v_proj", 2048, 1024, [("transformer", _block(0, "attn2.to_v"))]),
        ("blocks_12_mlp_layer1", 8192, 2048, [("transformer", _block(12, "ff.net.0.proj"))]),
        ("blocks_12_mlp_layer2", 2048, 8192, [("transformer", _block(12, "ff.net.2"))]),
        ("blocks_5_adaln_modulation_cross_attn_1", 256, 2048, [("transformer", _block(5, "norm2.linear_1"))]),
        ("blocks_5_adaln_modulation_mlp_2", 6144, 256, [("transformer", _block(5, "norm3.linear_2"))]),
        ("blocks_5_adaln_modulation_self_attn_1", 6144, 2048, None),  # no adaLN-LoRA: no diffusers layer
        ("final_layer_adaln_modulation_2", 4096, 256, [("transformer", "norm_out.linear_2")]),
        ("final_layer_adaln_modulation_1", 4096, 2048, None),
        ("final_layer_linear", 64, 2048, [("transformer", "proj_out")]),
        ("x_embedder_proj_1", 2048, 68, [("transformer", "patch_embed.proj")]),
        ("t_embedder_1_linear_2", 6144, 2048, [("transformer", "time_embed.t_embedder.linear_2")]),
        ("llm_adapter_blocks_5_cross_attn_k_proj", 1024, 1024,
         [("text_conditioner", "blocks.5.cross_attn.k_proj")]),
        ("llm_adapter_blocks_0_self_attn_o_proj", 1024, 1024, [("text_conditioner", "blocks.0.self_attn.o_proj")]),
        ("llm_adapter_blocks_2_mlp_2", 1024, 4096, [("text_conditioner", "blocks.2.mlp.2")]),
        ("llm_adapter_blocks_2_mlp_1", 4096, 1024, None),  # the GELU: no Linear
        ("llm_adapter_in_proj", 1024, 1024, None),  # outside the blocks kohya targets
        ("blocks_0_self_attn_q_norm", 128, 128, None),
        ("blocks_0_self_attn_o_proj", 2048, 2048, None),  # the adapter's leaf name in a DiT block
        ("double_blocks_0_img_attn_qkv", 192, 64, None),  # a FLUX name
    ],
)
def test_transformer_parts(name: str, rows: int, cols: int, parts: list | None) -> None:
    got = anima_keys.transformer_parts(name, rows, cols)
    assert (None if got is None else [(p.component, p.path) for p in got]) == parts
    assert got is None or all(p.rows == ((0, rows),) for p in got)  # one layer each, rows in place


@pytest.mark.parametrize(("module", "path"), [
    ("lora_te_layers_0_self_attn_q_proj", "layers.0.self_attn.q_proj"),
    ("lora_te_layers_27_self_attn_o_proj", "layers.27.self_attn.o_proj"),
    ("lora_te_layers_1_mlp_gate_proj", "layers.1.mlp.gate_proj"),
    ("lora_te_layers_1_mlp_down_proj", "layers.1.mlp.down_proj"),
    ("lora_te_model_layers_0_self_attn_q_proj", None),  # a Qwen3ForCausalLM path: kohya trains the inner model
    ("lora_te_layers_0_self_attn_q_norm", None),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", None),  # SDXL/FLUX's CLIP
])
def test_text_encoder_names(module: str, path: str | None) -> None:
    parts = anima_keys.module_parts(module, torch.zeros(4, 32), torch.zeros(32, 4))
    assert ([(p.component, p.path) for p in parts] if parts else None) == ([("text_encoder", path)] if path else None)
