"""SD3 assembled from the files kohya's sd3_train_network.py takes (sd3_files.py): a tiny SD3 saved as a diffusers
folder and as Stability's single file (MMDiT under model.diffusion_model., VAE under first_stage_model., text
encoders under text_encoders.*.transformer.) plus kohya's --clip_l / --clip_g / --t5xxl / --vae files; the
assembled pipeline's models compute exactly what the folder's do and it generates the same images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_monitor.config import EvalConfig
from lora_monitor.demo.flux_model import CLIP_CONFIG, T5_LAYERS, _t5_vocab, build_t5_tokenizer
from lora_monitor.demo.tokenizer import build_clip_tokenizer
from lora_monitor.errors import UserError
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation import sd3_files
from lora_monitor.evaluation.prompts import Prompt
from tests.evaluation.test_evaluator_flux import ldm_vae
from tests.sd3_model import make_models, transformer_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

CPU = torch.device("cpu")
PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11)]
WIDTH = 64  # CLIP-L and CLIP-G hidden size (one 64-wide head each, as SD3's CLIPs have); T5 and the MMDiT read 128
# diffusers' SD3Transformer2DModel -> Stability's MMDiT names, per joint block and at the top
_BLOCK = {"attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
          "attn2.to_out.0": "x_block.attn2.proj", "norm1.linear": "x_block.adaLN_modulation.1",
          "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
          "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
          "attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
          "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
          "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
_QKV = {"attn.to_": "x_block.attn.qkv", "attn.add_": "context_block.attn.qkv", "attn2.to_": "x_block.attn2.qkv"}
_TOP = {"pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
        "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}


def _swap(t: torch.Tensor) -> torch.Tensor:  # diffusers keeps (scale, shift) where Stability has (shift, scale)
    a, b = t.chunk(2)
    return torch.cat([b, a])


def stability_mmdit(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """diffusers' SD3 transformer weights in Stability's layout; every tensor used exactly once."""
    sd = dict(sd)
    out = {"pos_embed": sd.pop("pos_embed.pos_embed")}
    for leaf in ("weight", "bias"):
        for src, dst in _TOP.items():
            out[f"{dst}.{leaf}"] = sd.pop(f"{src}.{leaf}")
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = _swap(sd.pop(f"norm_out.linear.{leaf}"))
        for i in range(layers):
            d = f"transformer_blocks.{i}."
            for src, dst in _QKV.items():
                names = [f"{d}{src}{n}.{leaf}" for n in (("q", "k", "v") if src.endswith("to_") else
                                                         ("q_proj", "k_proj", "v_proj"))]
                if names[0] in sd:
                    out[f"joint_blocks.{i}.{dst}.{leaf}"] = torch.cat([sd.pop(n) for n in names])
            context = sd.pop(f"{d}norm1_context.linear.{leaf}")
            out[f"joint_blocks.{i}.context_block.adaLN_modulation.1.{leaf}"] = _swap(context) if i == layers - 1 \
                else context
            for src, dst in _BLOCK.items():
                if f"{d}{src}.{leaf}" in sd:
                    out[f"joint_blocks.{i}.{dst}.{leaf}"] = sd.pop(f"{d}{src}.{leaf}")
    assert not sd, sorted(sd)[:5]
    return out


def _build(root: Path, qk_norm: str | None, dual: tuple[int, ...]) -> tuple[Path, object]:
    """A tiny SD3 diffusers folder with CLIPs of 64-wide heads (CLIP-L's projection the identity)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    torch.manual_seed(5)
    clip = {**CLIP_CONFIG, "hidden_size": WIDTH, "num_attention_heads": 1, "projection_dim": WIDTH}
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(**clip))
    torch.nn.init.eye_(clip_l.text_projection.weight)  # kohya gives a CLIP-L file without a projection this one
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=SD3Transformer2DModel(**{**transformer_config(), "joint_attention_dim": 2 * WIDTH,
                                             "pooled_projection_dim": 2 * WIDTH, "qk_norm": qk_norm,
                                             "dual_attention_layers": dual}),
        vae=make_models()["vae"], text_encoder=clip_l,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**{**clip, "hidden_act": "gelu"})),
        text_encoder_3=T5EncoderModel(T5Config(vocab_size=len(_t5_vocab()), d_model=2 * WIDTH, **T5_LAYERS,
                                               decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
        tokenizer=CLIPTokenizer.from_pretrained(str(build_clip_tokenizer(root / "clip-tokenizer"))),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(root / "clip-tokenizer")),
        tokenizer_3=T5TokenizerFast.from_pretrained(str(build_t5_tokenizer(root / "t5-tokenizer"))),
    )
    pipe.save_pretrained(str(root / "model"), safe_serialization=True)
    return root / "model", pipe


@pytest.fixture(scope="module", params=["separate", "inside"])
def kohya(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`separate`: SD3.5-medium-like (q/k norm, dual attention in block 0), checkpoint = MMDiT only, every model a
    file of its own. `inside`: SD3-medium-like, VAE, CLIP-G and T5 inside the checkpoint, CLIP-L (no projection)
    given as --clip_l while the checkpoint holds a different CLIP-L: the separate file is the one used."""
    inside = request.param == "inside"
    root = tmp_path_factory.mktemp(f"sd3-files-{request.param}")
    folder, pipe = _build(root, None if inside else "rms_norm", () if inside else (0,))
    encoders = {"clip_l": {k: v for k, v in pipe.text_encoder.state_dict().items() if k != "text_projection.weight"},
                "clip_g": pipe.text_encoder_2.state_dict(),
                "t5xxl": {k: v for k, v in pipe.text_encoder_3.state_dict().items()
                          if k != "encoder.embed_tokens.weight"},
                "vae": ldm_vae(pipe.vae.state_dict(), 2)}
    checkpoint = {f"model.diffusion_model.{k}": v for k, v in
                  stability_mmdit(pipe.transformer.state_dict(), pipe.transformer.config.num_layers).items()}
    parts = {}
    for name, state in encoders.items():
        state = {k: v.clone().contiguous() for k, v in state.items()}
        if inside and name != "clip_l":
            prefix = "first_stage_model." if name == "vae" else f"text_encoders.{name}.transformer."
            checkpoint.update({prefix + k: v for k, v in state.items()})
            continue
        save_file(state, str(root / f"{name}.safetensors"))
        parts[name] = str(root / f"{name}.safetensors")
    if inside:  # a CLIP-L of other weights inside the checkpoint, which --clip_l replaces
        checkpoint.update({f"text_encoders.clip_l.transformer.{k}": torch.zeros_like(v)
                           for k, v in pipe.text_encoder.state_dict().items()})
    save_file(checkpoint, str(root / "sd3.safetensors"))
    cache = root / "tokenizers"  # kohya's --tokenizer_cache_dir layout
    for tokenizer, hub_id in zip((pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3), sd3_files.TOKENIZERS.values(),
                                 strict=True):
        tokenizer.save_pretrained(str(cache / hub_id.replace("/", "_")))
    parts["tokenizer_cache_dir"] = str(cache)
    return {"folder": folder, "file": root / "sd3.safetensors", "parts": parts, "root": root}


@pytest.fixture(scope="module")
def loaded(kohya: dict) -> tuple:
    assembled = pl.load_pipeline(str(kohya["file"]), False, CPU, family="sd3", parts=kohya["parts"])
    return assembled, pl.load_pipeline(str(kohya["folder"]), False, CPU, family="sd3")


def test_transformer_config_and_output_match_the_folders(loaded: tuple) -> None:
    assembled, folder = loaded
    assert type(assembled).__name__ == "StableDiffusion3Pipeline"
    configs = [{k: list(v) if isinstance(v, tuple | list) else v for k, v in p.transformer.config.items()
                if not k.startswith("_")} for p in loaded]
    assert configs[0] == configs[1]
    gen = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 32, 32, generator=gen),
              "encoder_hidden_states": torch.randn(1, 12, 2 * WIDTH, generator=gen),
              "pooled_projections": torch.randn(1, 2 * WIDTH, generator=gen), "timestep": torch.tensor([500.0])}
    with torch.no_grad():
        a, b = (p.transformer(**inputs).sample for p in (assembled, folder))
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_text_encoders_and_tokenizers_match_the_folders(loaded: tuple) -> None:
    assembled, folder = loaded
    text = "a woman wearing a blue coat"
    with torch.no_grad():
        for slot, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"),
                          ("text_encoder_3", "tokenizer_3")):
            ids = [getattr(p, tok)(text, padding="max_length", max_length=20, truncation=True,
                                   return_tensors="pt").input_ids for p in (assembled, folder)]
            assert torch.equal(*ids)
            out = [getattr(p, slot)(ids[0], output_hidden_states=True) for p in (assembled, folder)]
            assert torch.equal(out[0].hidden_states[-2], out[1].hidden_states[-2]), slot
            if slot != "text_encoder_3":
                assert torch.equal(out[0].text_embeds, out[1].text_embeds), slot


def test_assembled_pipeline_generates_the_folders_images(loaded: tuple, tmp_path: Path) -> None:
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2)
    images = [ev.Evaluator(p, PROMPTS, cfg, tmp_path / str(i)).generate_base().images for i, p in enumerate(loaded)]
    pixels = [[np.asarray(im, dtype=np.float64) for im in ims] for ims in images]
    assert len(pixels[0]) == 2 and all(np.array_equal(a, b) for a, b in zip(*pixels, strict=True))


@pytest.mark.parametrize("kohya", ["separate"], indirect=True)
@pytest.mark.parametrize(
    ("drop", "change", "message"),
    [
        (("t5xxl",), {}, r"kohya's --t5xxl must be given too"),
        (("clip_l", "vae"), {}, r"kohya's --clip_l, --vae must be given too"),
        ((), {"clip_g": "nowhere/clip_g.safetensors"}, r"kohya's --clip_g file nowhere/clip_g.safetensors does not"),
        ((), {"vae": "CLIP_L"}, r"not an SD3 VAE \(kohya's --vae\)"),
        ((), {"clip_g": "T5XXL"}, r"no CLIP-G text encoder \(kohya's --clip_g\)"),
    ],
)
def test_missing_or_wrong_files_fail_in_one_line(kohya: dict, drop: tuple, change: dict, message: str) -> None:
    named = {"CLIP_L": kohya["parts"]["clip_l"], "T5XXL": kohya["parts"]["t5xxl"]}
    parts = {k: named.get(v, v) for k, v in {**kohya["parts"], **change}.items() if k not in drop}
    with pytest.raises(UserError, match=message) as err:
        pl.load_pipeline(str(kohya["file"]), False, CPU, family="sd3", parts=parts)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kohya", ["separate"], indirect=True)
def test_a_diffusers_layout_transformer_file_points_to_its_folder(kohya: dict) -> None:
    with pytest.raises(UserError, match="diffusers' layout; set \\[eval\\] base_model to the diffusers folder"):
        pl.load_pipeline(str(kohya["folder"] / "transformer" / "diffusion_pytorch_model.safetensors"), False, CPU,
                         family="sd3", parts=kohya["parts"])


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({}, {"num_attention_heads": 24, "pos_embed_max_size": 192, "sample_size": 128, "qk_norm": None,
              "dual_attention_layers": (), "joint_attention_dim": 4096, "pooled_projection_dim": 2048}),
        ({"joint_blocks.0.x_block.attn.ln_q.weight": (64,), "joint_blocks.1.x_block.attn2.ln_q.weight": (64,)},
         {"qk_norm": "rms_norm", "dual_attention_layers": (1,)}),
        ({"pos_embed": (1, 64, 1536)}, {"pos_embed_max_size": 8, "sample_size": 8}),
    ],
)
def test_transformer_config_from_stability_shapes(shapes: dict, expected: dict) -> None:
    base = {"x_embedder.proj.weight": (1536, 16, 2, 2), "pos_embed": (1, 192 * 192, 1536),
            "context_embedder.weight": (1536, 4096), "y_embedder.mlp.0.weight": (1536, 2048),
            "final_layer.linear.weight": (64, 1536), "joint_blocks.0.x_block.attn.qkv.weight": (1,),
            "joint_blocks.1.x_block.attn.qkv.weight": (1,)}
    state = {k: torch.empty(s, device="meta") for k, s in {**base, **shapes}.items()}
    config = sd3_files.transformer_config(state, Path("sd3.safetensors"))
    assert config["num_layers"] == 2 and config["out_channels"] == 16 and config["patch_size"] == 2
    assert {k: config[k] for k in expected} == expected
