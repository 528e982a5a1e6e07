"""LoRA layouts of kohya, diffusers/peft, ai-toolkit and OneTrainer load into diffusers with equal effect.

One LoRA (UNet attention + conv 3x3 "LoCon" layers + text encoder, rank 4, alpha 1 so the scale 1/4
matters) is made with peft on the tiny SD model and saved as a kohya file, the reference. Every other
layout is written from the same tensors, normalised, loaded, and must give the reference UNet output
(text encoder included) with as many LoRA modules injected as the file has.
"""

from __future__ import annotations

import json
import os
import re
from copy import deepcopy as copy_module

import pytest
import torch

from lora_monitor.checkpoints.files import NotALoraError
from lora_monitor.checkpoints.formats import (
    describe_lora,
    detect_layout,
    injected_modules,
    ldm_to_diffusers_unet,
    lora_modules,
    normalize_lora_state,
    verify_applied,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

RANK = 4
ALPHA = 1.0
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "conv"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _peft_state(model: torch.nn.Module, targets: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The state dict of a peft LoRA on (a copy of) `model`, with random non-zero A and B."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    copy = inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets),
                                   copy_module(model), adapter_name="make")
    g = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(copy, adapter_name="make")
    return {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in state.items()}


def _make_kohya(unet_state: dict, te_state: dict) -> dict[str, torch.Tensor]:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    prefixed = {f"unet.{k}": v for k, v in unet_state.items()}
    prefixed |= {f"text_encoder.{k}": v for k, v in te_state.items()}
    kohya = convert_state_dict_to_kohya(prefixed)
    return {k: torch.tensor(ALPHA) if k.endswith(".alpha") else v for k, v in kohya.items()}


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from diffusers import StableDiffusionPipeline

    from lora_monitor.demo.sd_model import build_tiny_sd

    folder = build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    unet_state = _peft_state(pipe.unet, UNET_TARGETS, seed=1)
    te_state = _peft_state(pipe.text_encoder, TE_TARGETS, seed=2)
    kohya = _make_kohya(unet_state, te_state)
    base = _outputs(pipe)
    pipe.load_lora_weights(dict(kohya), adapter_name="reference")
    reference = _outputs(pipe)
    counts = injected_modules(pipe, "reference")
    pipe.delete_adapters("reference")
    return {"pipe": pipe, "unet": unet_state, "te": te_state, "kohya": kohya, "base": base,
            "reference": reference, "counts": counts}


@torch.inference_mode()
def _outputs(pipe) -> torch.Tensor:
    """UNet output for a fixed prompt, latent and timestep: passes through the text encoder and the UNet."""
    ids = pipe.tokenizer(["a photo of a red dress"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    text = pipe.text_encoder(ids)[0]
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


# ---------------------------------------------------------------- writers of each layout


def _modules(unet: dict, te: dict) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, diffusers module path) -> (down, up) from the peft state dicts."""
    out: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for component, state in (("unet", unet), ("text_encoder", te)):
        for key, down in state.items():
            if key.endswith(".lora_A.weight"):
                path = key.removesuffix(".lora_A.weight")
                out[(component, path)] = (down, state[f"{path}.lora_B.weight"])
    return out


def peft_with_metadata(unet: dict, te: dict) -> tuple[dict, dict]:
    """diffusers' save_lora_weights: lora_A/lora_B, alpha in the header's lora_adapter_metadata."""
    state = {f"{c}.{p}.lora_{ab}.weight": t for (c, p), (d, u) in _modules(unet, te).items()
             for ab, t in (("A", d), ("B", u))}
    meta = {f"{c}.{k}": v for c in ("unet", "text_encoder") for k, v in (("r", RANK), ("lora_alpha", ALPHA))}
    return state, {"lora_adapter_metadata": json.dumps(meta)}


def peft_folded(unet: dict, te: dict) -> tuple[dict, None]:
    """OneTrainer DIFFUSERS / ai-toolkit peft_format: lora_A/lora_B, alpha/rank folded into lora_B."""
    scale = ALPHA / RANK
    state = {}
    for (c, p), (d, u) in _modules(unet, te).items():
        state[f"{c}.{p}.lora_A.weight"] = d
        state[f"{c}.{p}.lora_B.weight"] = u * scale
    return state, None


def old_diffusers_with_alpha(unet: dict, te: dict) -> tuple[dict, None]:
    """Older diffusers layout: .lora.down/.lora.up weights and a per-module .alpha tensor."""
    state = {}
    for (c, p), (d, u) in _modules(unet, te).items():
        state[f"{c}.{p}.lora.down.weight"] = d
        state[f"{c}.{p}.lora.up.weight"] = u
        state[f"{c}.{p}.alpha"] = torch.tensor(ALPHA)
    return state, None


def onetrainer_internal(unet: dict, te: dict) -> tuple[dict, None]:
    """Dotted diffusers module paths with kohya suffixes (.lora_down/.lora_up/.alpha)."""
    state = {}
    for (c, p), (d, u) in _modules(unet, te).items():
        state[f"{c}.{p}.lora_down.weight"] = d
        state[f"{c}.{p}.lora_up.weight"] = u
        state[f"{c}.{p}.alpha"] = torch.tensor(ALPHA)
    return state, None


def kohya_with_bundled_embedding(unet: dict, te: dict) -> tuple[dict, None]:
    """OneTrainer LEGACY/KOHYA for SD 1.x: kohya keys plus a bundled placeholder embedding."""
    state = dict(_make_kohya(unet, te))
    state["bundle_emb.<sks>.clip_l"] = torch.zeros(1, 32)
    return state, None


_RESNET_TO_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}


def _tiny_sd_ldm_name(path: str) -> str:
    """The tiny SD UNet's (1 layer per block; attention in down 0 / up 1) module path in LDM naming."""
    if m := re.fullmatch(r"down_blocks\.(\d)\.resnets\.(\d)\.(\w+)", path):
        return f"input_blocks.{2 * int(m[1]) + int(m[2]) + 1}.0.{_RESNET_TO_LDM[m[3]]}"
    if m := re.fullmatch(r"down_blocks\.(\d)\.attentions\.(\d)\.(.+)", path):
        return f"input_blocks.{2 * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{2 * int(m[1]) + 2}.0.op"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(\w+)", path):
        return f"middle_block.{2 * int(m[1])}.{_RESNET_TO_LDM[m[2]]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.resnets\.(\d)\.(\w+)", path):
        return f"output_blocks.{2 * int(m[1]) + int(m[2])}.0.{_RESNET_TO_LDM[m[3]]}"
    if m := re.fullmatch(r"up_blocks\.(\d)\.attentions\.(\d)\.(.+)", path):
        return f"output_blocks.{2 * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.0\.upsamplers\.0\.conv", path):
        return "output_blocks.1.1.conv"  # up block 0 has no attention: the upsampler follows the resnet
    raise AssertionError(f"no LDM name for {path}")


def comfy(unet: dict, te: dict) -> tuple[dict, None]:
    """OneTrainer COMFY: diffusion_model.<LDM name>.lora_A/B + .alpha; text_encoders.clip_l.transformer."""
    state = {}
    for (c, p), (d, u) in _modules(unet, te).items():
        if c == "unet":
            name = f"diffusion_model.{_tiny_sd_ldm_name(p)}"
        else:
            name = f"text_encoders.clip_l.transformer.{p}"
        state |= {f"{name}.lora_A.weight": d, f"{name}.lora_B.weight": u}
        state[f"{name}.alpha"] = torch.tensor(ALPHA)
    return state, None


WRITERS = {
    "kohya": lambda u, t: (_make_kohya(u, t), None),
    "peft_metadata": peft_with_metadata,
    "peft_folded": peft_folded,
    "old_diffusers_alpha": old_diffusers_with_alpha,
    "onetrainer_internal": onetrainer_internal,
    "kohya_bundle_emb": kohya_with_bundled_embedding,
    "comfy": comfy,
}


@pytest.mark.parametrize("layout", list(WRITERS))
def test_layout_loads_like_reference(sd: dict, layout: str) -> None:
    state, meta = WRITERS[layout](sd["unet"], sd["te"])
    norm = normalize_lora_state(state, meta, layers_per_block=1)
    pipe = sd["pipe"]
    pipe.load_lora_weights(norm, adapter_name=layout)
    try:
        verify_applied(pipe, layout, norm)
        out = _outputs(pipe)
        injected = injected_modules(pipe, layout)
    finally:
        pipe.delete_adapters(layout)
    assert injected == lora_modules(norm) == sd["counts"]
    assert not torch.allclose(sd["reference"], sd["base"], atol=1e-3)  # the LoRA matters
    torch.testing.assert_close(out, sd["reference"], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(_outputs(pipe), sd["base"])  # deleting the adapter restores the base


def test_reference_covers_unet_locon_and_text_encoder(sd: dict) -> None:
    kohya = sd["kohya"]
    assert sd["counts"]["text_encoder"] == 2 * 6  # 2 layers x q, k, v, out, fc1, fc2
    conv3x3 = [k for k, v in kohya.items() if k.endswith("down.weight") and v.ndim == 4 and v.shape[-1] == 3]
    assert conv3x3  # LoCon layers are part of the check
    text = describe_lora(kohya)
    assert text.startswith(f"kohya LoRA, rank {RANK}, {sum(sd['counts'].values())} modules")
    assert "text encoder 12" in text and "LoCon" in text


def test_original_layout_without_prefix(sd: dict) -> None:
    # OneTrainer ORIGINAL: UNet only, LDM names at the top level
    state = {k.removeprefix("diffusion_model."): v for k, v in comfy(sd["unet"], {})[0].items()}
    assert detect_layout(state) == "original"
    norm = normalize_lora_state(state, layers_per_block=1)
    assert set(lora_modules(norm)) == {"unet"}
    assert lora_modules(norm)["unet"] == sd["counts"]["unet"]


def test_bundled_embedding_is_reported(sd: dict, caplog: pytest.LogCaptureFixture) -> None:
    state, _ = kohya_with_bundled_embedding(sd["unet"], sd["te"])
    with caplog.at_level("WARNING"):
        norm = normalize_lora_state(state)
    assert not any(k.startswith("bundle_emb") for k in norm)
    assert "bundle_emb" in caplog.text
    assert describe_lora(state).endswith("bundled embeddings ignored")


_BLOCK0 = "transformer_blocks.0"


@pytest.mark.parametrize(
    ("ldm", "diffusers_path"),
    [  # SD 1.x / SDXL layout: 2 layers per block
        ("input_blocks.0.0", "conv_in"),
        ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
        (f"input_blocks.2.1.{_BLOCK0}.attn1.to_q", f"down_blocks.0.attentions.1.{_BLOCK0}.attn1.to_q"),
        ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
        ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
        ("input_blocks.8.1.proj_out", "down_blocks.2.attentions.1.proj_out"),
        ("middle_block.0.emb_layers.1", "mid_block.resnets.0.time_emb_proj"),
        (f"middle_block.1.{_BLOCK0}.ff.net.2", f"mid_block.attentions.0.{_BLOCK0}.ff.net.2"),
        ("middle_block.2.out_layers.3", "mid_block.resnets.1.conv2"),
        ("output_blocks.0.0.in_layers.2", "up_blocks.0.resnets.0.conv1"),
        ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),  # SD 1.x: no attention in up block 0
        ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),  # SDXL: after the attention
        (f"output_blocks.5.1.{_BLOCK0}.attn2.to_k", f"up_blocks.1.attentions.2.{_BLOCK0}.attn2.to_k"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("label_emb.0.0", "add_embedding.linear_1"),
        ("out.2", "conv_out"),
    ],
)
def test_ldm_names(ldm: str, diffusers_path: str) -> None:
    assert ldm_to_diffusers_unet(ldm) == diffusers_path


_D, _U = torch.zeros(4, 32), torch.zeros(32, 4)
_KOHYA = {"lora_unet_a.lora_down.weight": _D, "lora_unet_a.lora_up.weight": _U}


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({}, "no tensors"),
        ({"model.diffusion_model.input_blocks.0.0.weight": _D}, "full model"),
        ({"lora_unet_a.hada_w1_a": _D, "lora_unet_a.hada_w1_b": _D, "lora_unet_a.alpha": _D}, "LoHa"),
        ({"lora_unet_a.lokr_w1": _D, "lora_unet_a.lokr_w2": _D}, "LoKr"),
        (_KOHYA | {"lora_unet_a.dora_scale": _U}, "DoRA"),
        (_KOHYA | {"lora_unet_a.magnitude": _U}, "DoRA"),
        ({"unet.a.lora_A.weight": _D, "unet.a.lora_B.weight": _U, "unet.a.lora_magnitude_vector": _U},
         "DoRA"),
        (_KOHYA | {"lora_unet_a.lora_mid.weight": _D}, "Tucker"),
        ({"lora_unet_a.diff": _D}, "full-weight difference"),
        ({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": _D}, "transformer model"),
        ({"lora_transformer_single_blocks_0_linear1.lora_down.weight": _D}, "transformer model"),
        ({"lora_unet_a.lora_down.weight": _D}, "lacks its lora_down or lora_up"),
        (_KOHYA | {"lora_unet_a.lora_up.weight": torch.zeros(32, 8)}, "ranks differ"),
        (_KOHYA | {"lora_unet_a.scale": _U}, "unexpected tensor"),
        (_KOHYA | {"other.lora_A.weight": _D}, "unexpected key"),
        ({"unet.a.lora_A.weight": _D}, "lacks its down (A) or up (B)"),
        ({"vae.decoder.lora_A.weight": _D, "vae.decoder.lora_B.weight": _U}, "names no unet"),
        ({"input_blocks.99.7.weird.lora_A.weight": _D, "input_blocks.99.7.weird.lora_B.weight": _U},
         "unrecognised UNet layer"),
    ],
)
def test_refused(state: dict, reason: str) -> None:
    with pytest.raises(NotALoraError, match=re.escape(reason)):
        normalize_lora_state(state)


@pytest.mark.parametrize(
    ("meta", "expected_scale"),
    [
        (None, 1.0),
        ({"unet.r": 4, "unet.lora_alpha": 8}, 2.0),
        ({"unet.r": 4, "unet.lora_alpha": 8, "unet.use_rslora": True}, 4.0),
        ({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": 2}}, 0.5),
        ({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_q": 2}}, 2.0),
        ({"text_encoder.r": 4, "text_encoder.lora_alpha": 8}, 1.0),  # another component's alpha
    ],
)
def test_peft_alpha_from_metadata(meta: dict | None, expected_scale: float) -> None:
    up = torch.ones(32, 4)
    state = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": _D,
             "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": up}
    header = {"lora_adapter_metadata": json.dumps(meta)} if meta else None
    norm = normalize_lora_state(state, header)
    b = norm["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"]
    assert float(b[0, 0]) == pytest.approx(expected_scale)


@pytest.mark.parametrize(
    ("key", "expected"),
    [  # older diffusers names map to the peft module paths
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
         "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight",
         "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight",
         "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight"),
        ("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight",
         "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"),
        ("base_model.model.conv_in.lora_A.weight", "unet.conv_in.lora_A.weight"),
        ("down_blocks.0.resnets.0.conv1.lora_B.weight", "unet.down_blocks.0.resnets.0.conv1.lora_B.weight"),
    ],
)
def test_old_peft_names(key: str, expected: str) -> None:
    partner = {".down.": ".up.", ".up.": ".down.", "lora_A": "lora_B", "lora_B": "lora_A"}
    other = next(key.replace(a, b) for a, b in partner.items() if a in key)
    down, up = (_D, _U) if ("down" in key or "lora_A" in key) else (_U, _D)
    norm = normalize_lora_state({key: down, other: up})
    assert expected in norm


def test_shape_mismatch_names_the_shape(sd: dict) -> None:
    # a LoRA for a wider base (in-features 48, the tiny model has 32): diffusers/peft refuse to load it
    state = {k: (torch.zeros(v.shape[0], 48) if k.endswith("lora_down.weight") and v.ndim == 2 else v)
             for k, v in sd["kohya"].items() if k.startswith("lora_unet_")}
    pipe = sd["pipe"]
    with pytest.raises(Exception) as info:  # noqa: B017, PT011 - the type is what this test records
        pipe.load_lora_weights(normalize_lora_state(state), adapter_name="wrong_base")
    text = str(info.value)
    assert isinstance(info.value, RuntimeError | ValueError), type(info.value)
    assert "size mismatch" in text or "shape" in text.lower()
    if "wrong_base" in getattr(pipe.unet, "peft_config", {}):
        pipe.delete_adapters("wrong_base")
    torch.testing.assert_close(_outputs(pipe), sd["base"])


def test_partly_matching_lora_is_detected(sd: dict) -> None:
    # diffusers loads the modules it finds and skips the rest without an error
    state = dict(sd["kohya"])
    real = "lora_unet_down_blocks_0_attentions_0_proj_in"
    absent = real.replace("blocks_0", "blocks_7")  # the tiny UNet has 2 down blocks
    for suffix in (".lora_down.weight", ".lora_up.weight"):
        state[absent + suffix] = state[real + suffix]
    pipe = sd["pipe"]
    norm = normalize_lora_state(state)
    pipe.load_lora_weights(norm, adapter_name="partial")
    try:
        with pytest.raises(NotALoraError, match=f"only part of the LoRA fits.*1 of .* not applied \\({absent}\\)"):
            verify_applied(pipe, "partial", norm)
        # the modules that exist were all applied: the reference's count
        assert injected_modules(pipe, "partial") == sd["counts"]
    finally:
        pipe.delete_adapters("partial")
