"""FLUX.1 evaluation on a tiny FluxPipeline built from configs: loading (diffusers folder, or kohya's separate
files), FLUX's defaults, kohya's LoRA merged and the base restored bit for bit, cached prompt embeddings."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_monitor.config import EvalConfig
from lora_monitor.demo.flux_model import build_tiny_flux
from lora_monitor.errors import UserError
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import flux_files
from lora_monitor.evaluation import lora_state as ls
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.prompts import Prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

FIXTURE = Path(__file__).parents[1] / "fixtures" / "kohya-families" / "flux" / "tiny-step00000004.safetensors"
PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11), Prompt("a hat")]
CPU = torch.device("cpu")


def _cfg(**kw: object) -> EvalConfig:
    return EvalConfig(**{"device": "cpu", "steps": 2, "width": 64, "height": 64, "batch_size": 2, **kw})


def _pixels(images: list) -> list[np.ndarray]:
    return [np.asarray(im, dtype=np.float64) for im in images]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "model")


def test_flux_defaults_guidance_embedding_no_negative_prompt(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="flux")
    assert type(pipe).__name__ == "FluxPipeline"
    evaluator = ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", negative_prompt="blurry"), tmp_path)
    # 128 latent px x the tiny VAE's scale 2 (FLUX.1: x 8 = 1024); 20 steps; guidance 3.5; no negative prompt
    assert evaluator._groups() == {(256, 256, 20, 3.5, ""): [0, 1, 2]}
    with pytest.raises(UserError, match="FLUX.1 samples with its own flow-matching scheduler"):
        ev.Evaluator(pipe, PROMPTS, EvalConfig(device="cpu", scheduler="ddim"), tmp_path)


def test_kohya_lora_changes_images_and_the_base_comes_back_bit_for_bit(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="flux")
    evaluator = ev.Evaluator(pipe, PROMPTS, _cfg(), tmp_path)
    base = evaluator.generate_base()
    assert [im.size for im in base.images] == [(64, 64)] * 3 and base.seeds == [42, 11, 44]
    with_lora = evaluator.generate(FIXTURE)  # kohya's own FLUX file: 13 transformer + 12 CLIP-L modules
    pairs = zip(_pixels(base.images), _pixels(with_lora.images), strict=True)
    assert all(np.abs(a - b).mean() > 0.01 for a, b in pairs)
    again = evaluator.generate_base()
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(base.images), _pixels(again.images), strict=True))
    # a fresh pipeline gives the same LoRA images: fixed CPU-generator seeds, same merge
    other = ev.Evaluator(pl.load_pipeline(str(tiny), False, CPU, family="flux"), PROMPTS, _cfg(), tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(with_lora.images),
                                                     _pixels(other.generate(FIXTURE).images), strict=True))


def test_merged_lora_reaches_the_transformer_and_is_restored(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="flux")
    evaluator = ev.Evaluator(pipe, PROMPTS, _cfg(), tmp_path)
    before = pipe.transformer.transformer_blocks[0].attn.to_q.weight.detach().clone()
    evaluator.swap_in(ls.load_lora_state(FIXTURE, "flux"))
    layer = pipe.transformer.transformer_blocks[0].attn.to_q  # now peft's wrapper of the same Linear
    with evaluator._merged():
        merged = layer.base_layer.weight.detach().clone()
    assert not torch.equal(merged, before)
    assert torch.equal(layer.base_layer.weight, before)


def test_prompt_embeddings_are_computed_once_per_run_without_a_text_encoder_lora(tiny: Path, tmp_path: Path) -> None:
    pipe = pl.load_pipeline(str(tiny), False, CPU, family="flux")
    evaluator = ev.Evaluator(pipe, PROMPTS, _cfg(), tmp_path)
    calls = []
    encode = evaluator.adapter.encode
    evaluator.adapter.encode = lambda *a, **kw: calls.append(a[0]) or encode(*a, **kw)  # type: ignore[method-assign]
    unet_only = {k: v for k, v in load_file(str(FIXTURE)).items() if k.startswith("lora_unet_")}
    path = tmp_path / "unet_only.safetensors"
    save_file(unet_only, str(path), metadata={"ss_base_model_version": "flux1"})
    evaluator.generate(path)
    evaluator.generate(path)
    assert len(calls) == 1
    evaluator.generate(FIXTURE)  # CLIP-L LoRA: the embeddings of this checkpoint's text encoder
    assert len(calls) == 2
    embeds = encode(["a hat"], CPU, 3.5, "")
    assert set(embeds) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert embeds["prompt_embeds"].shape == (1, 64, 32) and embeds["pooled_prompt_embeds"].shape == (1, 32)


# ------------------------------------------------------------------------ kohya's separate model files
_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
           "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
           "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin"}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer"}
_NORMS = {"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm",
          "norm_added_q": "txt_attn.norm.query_norm", "norm_added_k": "txt_attn.norm.key_norm"}


def bfl_transformer(sd: dict[str, torch.Tensor], double: int, single: int) -> dict[str, torch.Tensor]:
    """diffusers' FLUX transformer weights in BFL's layout (what kohya's convert_diffusers_sd_to_bfl writes)."""
    out: dict[str, torch.Tensor] = {}
    for leaf in ("weight", "bias"):
        for src, dst in _TOP.items():
            out[f"{dst}.{leaf}"] = sd[f"{src}.{leaf}"]
        scale, shift = sd[f"norm_out.linear.{leaf}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
        for i in range(double):
            d = f"transformer_blocks.{i}."
            out[f"double_blocks.{i}.img_attn.qkv.{leaf}"] = torch.cat([sd[f"{d}attn.{n}.{leaf}"] for n in
                                                                      ("to_q", "to_k", "to_v")])
            out[f"double_blocks.{i}.txt_attn.qkv.{leaf}"] = torch.cat([sd[f"{d}attn.{n}.{leaf}"] for n in
                                                                      ("add_q_proj", "add_k_proj", "add_v_proj")])
            for src, dst in _DOUBLE.items():
                out[f"double_blocks.{i}.{dst}.{leaf}"] = sd[f"{d}{src}.{leaf}"]
        for i in range(single):
            s = f"single_transformer_blocks.{i}."
            out[f"single_blocks.{i}.linear1.{leaf}"] = torch.cat([sd[f"{s}{n}.{leaf}"] for n in
                                                                 ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
            out[f"single_blocks.{i}.linear2.{leaf}"] = sd[f"{s}proj_out.{leaf}"]
            out[f"single_blocks.{i}.modulation.lin.{leaf}"] = sd[f"{s}norm.linear.{leaf}"]
    for i in range(double):
        for src, dst in _NORMS.items():
            out[f"double_blocks.{i}.{dst}.scale"] = sd[f"transformer_blocks.{i}.attn.{src}.weight"]
    for i in range(single):
        out[f"single_blocks.{i}.norm.query_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_q.weight"]
        out[f"single_blocks.{i}.norm.key_norm.scale"] = sd[f"single_transformer_blocks.{i}.attn.norm_k.weight"]
    return out


def ldm_vae(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKL weights in BFL's ae.safetensors (LDM) layout."""

    def up(m: re.Match) -> int:  # LDM numbers the decoder's levels from the lowest resolution up
        return levels - 1 - int(m[1])

    rules = [
        (r"(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{up(m)}.block.{m[2]}."),
        (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up(m)}.upsample."),
        (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
        (r"mid_block\.attentions\.0\.to_(q|k|v)\.", r"mid.attn_1.\1."),
        (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
        (r"conv_shortcut", "nin_shortcut"),
    ]
    out = {}
    for key, tensor in sd.items():
        name = key
        for pattern, repl in rules:
            name = re.sub(pattern, repl, name)
        if ".attn_1." in name and name.endswith("weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[name] = tensor
    return out


@pytest.fixture(scope="module")
def kohya_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny FLUX at FLUX.1's head width (128) as a diffusers folder and as kohya's four separate files."""
    from diffusers import FluxPipeline

    root = tmp_path_factory.mktemp("flux-files")
    folder = build_tiny_flux(root / "model", seed=3, clip={"hidden_size": 64, "num_attention_heads": 1},
                             transformer={"attention_head_dim": 128, "num_attention_heads": 1,
                                          "axes_dims_rope": (16, 56, 56), "pooled_projection_dim": 64})
    pipe = FluxPipeline.from_pretrained(str(folder))
    files = {name: root / f"{name}.safetensors" for name in ("flux", "clip_l", "t5xxl", "ae")}
    save_file(bfl_transformer(pipe.transformer.state_dict(), 1, 1), str(files["flux"]))
    clip = {f"text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}  # transformers 4's names
    save_file(clip, str(files["clip_l"]))
    t5 = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(files["t5xxl"]))
    save_file(ldm_vae(pipe.vae.state_dict(), 2), str(files["ae"]))
    cache = root / "tokenizers"  # kohya's --tokenizer_cache_dir layout
    pipe.tokenizer.save_pretrained(str(cache / "openai_clip-vit-large-patch14"))
    pipe.tokenizer_2.save_pretrained(str(cache / "google_t5-v1_1-xxl"))
    return {**files, "folder": folder, "cache": cache}


def test_pipeline_assembled_from_kohyas_files_generates_what_the_diffusers_folder_does(
    kohya_files: dict[str, Path], tmp_path: Path
) -> None:
    parts = {"clip_l": str(kohya_files["clip_l"]), "t5xxl": str(kohya_files["t5xxl"]), "ae": str(kohya_files["ae"]),
             "tokenizer_cache_dir": str(kohya_files["cache"])}
    assembled = pl.load_pipeline(str(kohya_files["flux"]), False, CPU, family="flux", parts=parts)
    folder = pl.load_pipeline(str(kohya_files["folder"]), False, CPU, family="flux")
    assert assembled.transformer.config.num_attention_heads == 1 and assembled.transformer.config.guidance_embeds
    images = [ev.Evaluator(p, PROMPTS[:2], _cfg(), tmp_path).generate_base().images for p in (assembled, folder)]
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(images[0]), _pixels(images[1]), strict=True))


def test_missing_kohya_parts_fail_in_one_line(kohya_files: dict[str, Path]) -> None:
    with pytest.raises(UserError, match=r"kohya's --t5xxl, --ae must be given too") as err:
        pl.load_pipeline(str(kohya_files["flux"]), False, CPU, family="flux",
                         parts={"clip_l": str(kohya_files["clip_l"])})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("head_dim", "message"),
    [(128, None), (16, "attention heads of 16, not FLUX.1's 128")],
)
def test_transformer_config_from_bfl_shapes(head_dim: int, message: str | None) -> None:
    hidden = 2 * head_dim
    state = {"img_in.weight": torch.zeros(hidden, 64), "final_layer.linear.weight": torch.zeros(64, hidden),
             "double_blocks.0.img_attn.norm.query_norm.scale": torch.zeros(head_dim),
             "double_blocks.1.img_attn.proj.weight": torch.zeros(1), "single_blocks.0.linear2.weight": torch.zeros(1),
             "txt_in.weight": torch.zeros(hidden, 4096), "vector_in.in_layer.weight": torch.zeros(hidden, 768)}
    if message:
        with pytest.raises(UserError, match=message):
            flux_files.transformer_config(state, Path("x.safetensors"))
        return
    config = flux_files.transformer_config(state, Path("x.safetensors"))
    assert (config["num_layers"], config["num_single_layers"], config["num_attention_heads"]) == (2, 1, 2)
    assert (config["joint_attention_dim"], config["pooled_projection_dim"], config["guidance_embeds"]) == (
        4096, 768, False)
