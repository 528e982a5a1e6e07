"""kohya's Lumina 2 LoRA (the fixture, written by kohya's own lora_lumina) applied to diffusers'
Lumina2Transformer2DModel and a Gemma2Model built from the fixture's configs: every module applied, each adapted
layer's weight delta equal to scale * B @ A computed by hand from the file (the grouped-query qkv cut at the widths
the kohya model's head counts give), and forward passes equal to the base models with those deltas added."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_monitor.checkpoints import coverage, lumina_keys
from lora_monitor.config import EvalConfig
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import lora_attach

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

FOLDER = Path(__file__).parent.parent / "fixtures" / "kohya-families" / "lumina"
FILE = FOLDER / "tiny-step00000004.safetensors"
INFO = json.loads((FOLDER / "model.json").read_text())
KOHYA = INFO["kohya_model"]["kwargs"]
CONFIG = INFO["diffusers_equivalent"]["config"]
GEMMA2 = INFO["text_encoders"]["gemma2"]["Gemma2Config"]


def hand_split(name: str, rows: int) -> dict[str, list[slice]]:
    """diffusers layer -> row slices of kohya's up matrix, written out from NextDiT's layout and head counts."""
    if m := re.fullmatch(r"lora_te_layers_(\d+)_(self_attn|mlp)_(\w+)", name):
        return {f"layers.{m[1]}.{m[2]}.{m[3]}": [slice(0, rows)]}
    if name == "lora_unet_final_layer_linear":
        return {"norm_out.linear_2": [slice(0, rows)]}
    if name == "lora_unet_final_layer_adaLN_modulation_1":  # one scale, in both models
        return {"norm_out.linear_1": [slice(0, rows)]}
    m = re.fullmatch(r"lora_unet_(layers|noise_refiner|context_refiner)_(\d+)_(\w+)", name)
    assert m, name
    block, leaf = f"{m[1]}.{m[2]}", m[3]
    if leaf == "attention_qkv":
        head = KOHYA["dim"] // KOHYA["n_heads"]
        q, kv = KOHYA["n_heads"] * head, KOHYA["n_kv_heads"] * head
        assert q + 2 * kv == rows
        return {f"{block}.attn.to_q": [slice(0, q)], f"{block}.attn.to_k": [slice(q, q + kv)],
                f"{block}.attn.to_v": [slice(q + kv, rows)]}
    plain = {"attention_out": "attn.to_out.0", "feed_forward_w1": "feed_forward.linear_1",
             "feed_forward_w2": "feed_forward.linear_2", "feed_forward_w3": "feed_forward.linear_3",
             "adaLN_modulation_1": "norm1.linear"}  # (scale_msa, gate_msa, scale_mlp, gate_mlp) in both
    return {f"{block}.{plain[leaf]}": [slice(0, rows)]}


def hand_deltas(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    deltas = {}
    for key in state:
        if key.startswith(prefix) and key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            down, up = state[key].float(), state[f"{name}.lora_up.weight"].float()
            scale = state[f"{name}.alpha"].float().item() / down.shape[0]
            for path, rows in hand_split(name, up.shape[0]).items():
                deltas[path] = scale * torch.cat([up[r] for r in rows]) @ down
    return deltas


def expected_targets(state: dict[str, torch.Tensor]) -> dict[str, tuple[coverage.Target, ...]]:
    """File module -> (component, underscored path) of each layer lumina_keys maps it to."""
    out = {}
    for key in state:
        if key.endswith(".lora_down.weight"):
            name = key.split(".")[0]
            parts = lumina_keys.module_parts(name, state[key], state[f"{name}.lora_up.weight"]) or []
            out[name] = tuple((p.component, p.path.replace(".", "_")) for p in parts) or (("?", name),)
    return out


def make_transformer():
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(0)
    return Lumina2Transformer2DModel.from_config(CONFIG).eval()


def make_text_encoder():
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(1)
    return Gemma2Model(Gemma2Config(**GEMMA2)).eval()


def test_every_fixture_module_maps_and_each_layer_gets_its_hand_computed_delta() -> None:
    state = load_file(str(FILE))
    model = make_transformer()
    peft = {k: v for k, v in lumina_keys.to_diffusers(state).items() if k.startswith("transformer.")}
    model.load_lora_adapter(peft, adapter_name="t")
    expected = {k: v for k, v in expected_targets(state).items() if k.startswith("lora_unet_")}
    adapted = coverage.adapted_targets({"transformer": model}, "t")
    assert len(expected) == 19 and coverage.left_over(expected, adapted) == []
    deltas = hand_deltas(state, "lora_unet_")
    assert len(deltas) == len(adapted) == 25  # 19 kohya modules, three fused qkv of three layers each
    layers = dict(model.named_modules())
    for path, delta in deltas.items():
        torch.testing.assert_close(layers[path].get_delta_weight("t").float(), delta, atol=1e-6, rtol=1e-5, msg=path)


def qkv(block: str, q: int, kv: int) -> list[tuple[str, tuple]]:
    return [(f"{block}.attn.to_q", ((0, q),)), (f"{block}.attn.to_k", ((q, q + kv),)),
            (f"{block}.attn.to_v", ((q + kv, q + 2 * kv),))]


@pytest.mark.parametrize(
    ("name", "rows", "cols", "paths"),
    [
        # Lumina-Image-2.0: hidden 2304, 24 heads, 8 kv heads of 96
        ("layers_25_attention_qkv", 3840, 2304, qkv("layers.25", 2304, 768)),
        ("noise_refiner_1_attention_qkv", 128, 64, qkv("noise_refiner.1", 64, 32)),  # the fixture's 2 / 1 heads
        ("context_refiner_0_attention_qkv", 96, 32, qkv("context_refiner.0", 32, 32)),  # no grouping: thirds
        ("layers_0_attention_qkv", 129, 64, None),  # k and v not equal: no guess
        ("layers_0_attention_qkv", 64, 64, None),
        ("layers_3_attention_out", 2304, 2304, [("layers.3.attn.to_out.0", ((0, 2304),))]),
        ("context_refiner_1_feed_forward_w2", 64, 256, [("context_refiner.1.feed_forward.linear_2", ((0, 64),))]),
        ("noise_refiner_0_feed_forward_w3", 256, 64, [("noise_refiner.0.feed_forward.linear_3", ((0, 256),))]),
        ("layers_0_feed_forward_w1", 256, 64, [("layers.0.feed_forward.linear_1", ((0, 256),))]),
        ("layers_7_adaLN_modulation_1", 9216, 1024, [("layers.7.norm1.linear", ((0, 9216),))]),  # min(hidden, 1024) in
        ("noise_refiner_0_adaLN_modulation_1", 256, 64, [("noise_refiner.0.norm1.linear", ((0, 256),))]),
        ("context_refiner_0_adaLN_modulation_1", 256, 64, None),  # the context refiner has no modulation
        ("final_layer_adaLN_modulation_1", 2304, 1024, [("norm_out.linear_1", ((0, 2304),))]),
        ("final_layer_linear", 64, 2304, [("norm_out.linear_2", ((0, 64),))]),
        ("x_embedder", 2304, 64, [("x_embedder", ((0, 2304),))]),
        ("t_embedder_mlp_0", 1024, 256, [("time_caption_embed.timestep_embedder.linear_1", ((0, 1024),))]),
        ("t_embedder_mlp_2", 1024, 1024, [("time_caption_embed.timestep_embedder.linear_2", ((0, 1024),))]),
        ("cap_embedder_1", 2304, 2304, [("time_caption_embed.caption_embedder.1", ((0, 2304),))]),
        ("layers_0_attention_q_norm", 64, 64, None),
        ("double_blocks_0_img_attn_qkv", 192, 64, None),  # a FLUX name
    ],
)
def test_transformer_parts(name: str, rows: int, cols: int, paths: list | None) -> None:
    parts = lumina_keys.transformer_parts(name, rows, cols)
    assert (None if parts is None else [(p.path, p.rows) for p in parts]) == paths


@pytest.mark.parametrize(("module", "path"), [
    ("lora_te_layers_0_self_attn_q_proj", "layers.0.self_attn.q_proj"),
    ("lora_te_layers_25_self_attn_o_proj", "layers.25.self_attn.o_proj"),
    ("lora_te_layers_1_mlp_gate_proj", "layers.1.mlp.gate_proj"),
    ("lora_te_layers_1_mlp_down_proj", "layers.1.mlp.down_proj"),
    ("lora_te_layers_1_mlp_fc1", None),  # a CLIP leaf
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", None),  # SDXL/FLUX's CLIP
])
def test_text_encoder_names(module: str, path: str | None) -> None:
    parts = lumina_keys.module_parts(module, torch.zeros(4, 32), torch.zeros(32, 4))
    assert ([(p.component, p.path) for p in parts] if parts else None) == ([("text_encoder", path)] if path else None)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, CONFIG["in_channels"], 8, 8, generator=g),
        "timestep": torch.tensor([0.4]),
        "encoder_hidden_states": torch.randn(1, 6, CONFIG["cap_feat_dim"], generator=g),
        "encoder_attention_mask": torch.tensor([[True] * 4 + [False] * 2]),
    }


def test_transformer_forward_with_the_lora_equals_the_base_plus_the_hand_computed_delta() -> None:
    state = load_file(str(FILE))
    transformer = make_transformer()
    base = copy.deepcopy(transformer)
    peft = {k: v for k, v in lumina_keys.to_diffusers(state).items() if k.startswith("transformer.")}
    transformer.load_lora_adapter(peft, adapter_name="t")
    reference = copy.deepcopy(base)
    layers = dict(reference.named_modules())
    with torch.no_grad():
        for path, delta in hand_deltas(state, "lora_unet_").items():
            layers[path].weight += delta
        inputs = _inputs()
        want = reference(**inputs, return_dict=False)[0]
        got = transformer(**inputs, return_dict=False)[0]
        unchanged = base(**inputs, return_dict=False)[0]
    assert (want - unchanged).abs().max() > 1e-4  # the LoRA changes the output, so equality below means something
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def _pipe(transformer, text_encoder):
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    return Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                           text_encoder=text_encoder, tokenizer=None)


def test_through_the_evaluator_the_gemma2_encoder_gets_its_keys_and_gives_them_back(tmp_path: Path) -> None:
    """Lumina2Pipeline's loader takes the transformer only: the evaluator applies the Gemma2 modules itself."""
    state = load_file(str(FILE))
    text_encoder = make_text_encoder()
    base = copy.deepcopy(text_encoder)
    pipe = _pipe(make_transformer(), text_encoder)
    evaluator = ev.Evaluator(pipe, [], EvalConfig(device="cpu"), tmp_path)
    assert evaluator.family == "lumina"
    evaluator.swap_in(state)  # raises unless all 33 modules (19 transformer, 14 Gemma2) reached their layers
    adapted = coverage.adapted_targets(evaluator._components(), evaluator._adapter)
    expected = expected_targets(state)
    assert len(expected) == 33 and coverage.left_over(expected, adapted) == []
    deltas = hand_deltas(state, "lora_te_")
    layers = dict(text_encoder.named_modules())
    for path, delta in deltas.items():
        torch.testing.assert_close(layers[path].get_delta_weight(evaluator._adapter).float(), delta, atol=1e-6,
                                   rtol=1e-5, msg=path)
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
    evaluator.unload()
    assert coverage.adapted_targets(evaluator._components(), "ckpt1") == set()
    with torch.no_grad():
        torch.testing.assert_close(text_encoder(input_ids=ids).last_hidden_state, unchanged)


def test_text_encoder_modules_of_different_ranks_keep_their_own_rank() -> None:
    state = load_file(str(FILE))
    name = "lora_te_layers_1_mlp_down_proj"  # kohya's resize and per-module dims give such files
    state[f"{name}.lora_down.weight"] = state[f"{name}.lora_down.weight"][:2].clone()
    state[f"{name}.lora_up.weight"] = state[f"{name}.lora_up.weight"][:, :2].clone()
    text_encoder = make_text_encoder()
    peft = lumina_keys.to_diffusers(state)
    lora_attach.attach(text_encoder, {k[len("text_encoder."):]: v for k, v in peft.items()
                                      if k.startswith("text_encoder.")}, "a")
    layers = dict(text_encoder.named_modules())
    assert layers["layers.1.mlp.down_proj"].r["a"] == 2 and layers["layers.0.mlp.down_proj"].r["a"] == 4
    for path, delta in hand_deltas(state, "lora_te_").items():
        torch.testing.assert_close(layers[path].get_delta_weight("a").float(), delta, atol=1e-6, rtol=1e-5, msg=path)
