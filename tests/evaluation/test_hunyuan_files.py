"""HunyuanImage 2.1 assembled from the files kohya's hunyuan_image_train_network.py takes (hunyuan_files.py): the
tiny pipeline of tests/hunyuan_model.py saved as a diffusers folder and, by hand, in kohya's layouts: the DiT in
Tencent's original names (--pretrained_model_name_or_path), Qwen2.5-VL in transformers' older names
(--text_encoder), ByT5 as `shared` + `encoder.*` (--byt5) and the VAE in Tencent's names (--vae). The assembled
pipeline's models compute exactly what the folder's do and it generates the same images."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_monitor.config import EvalConfig
from lora_monitor.errors import UserError
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import hunyuan_files
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.prompts import Prompt
from tests.hunyuan_model import FIXTURE, build_tiny_hunyuan

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

PROMPTS = [Prompt("a photo of a red dress"), Prompt('a shirt that says "hello"', seed=11)]  # 2nd: quoted text
FP32 = torch.float32

# diffusers' HunyuanImageTransformer2DModel -> Tencent's names (kohya's library/hunyuan_image_modules.py)
_DOUBLE = {"attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj", "ff.net.0.proj": "img_mlp.fc1",
           "ff.net.2": "img_mlp.fc2", "ff_context.net.0.proj": "txt_mlp.fc1", "ff_context.net.2": "txt_mlp.fc2",
           "norm1.linear": "img_mod.linear", "norm1_context.linear": "txt_mod.linear",
           "attn.norm_q": "img_attn_q_norm", "attn.norm_k": "img_attn_k_norm",
           "attn.norm_added_q": "txt_attn_q_norm", "attn.norm_added_k": "txt_attn_k_norm"}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.linear", "attn.norm_q": "q_norm",
           "attn.norm_k": "k_norm"}
_REFINER = {"attn.to_out.0": "self_attn_proj", "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2",
            "norm_out.linear": "adaLN_modulation.1", "norm1": "norm1", "norm2": "norm2"}
_TOP = {"x_embedder.proj": "img_in.proj", "context_embedder.proj_in": "txt_in.input_embedder",
        "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
        "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
        "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
        "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
        "context_embedder_2.norm": "byt5_in.layernorm", "context_embedder_2.linear_1": "byt5_in.fc1",
        "context_embedder_2.linear_2": "byt5_in.fc2", "context_embedder_2.linear_3": "byt5_in.fc3",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.mlp.0",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.mlp.2", "proj_out": "final_layer.linear"}


def original_dit(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers' transformer weights in Tencent's layout (fused qkv / linear1); every tensor used exactly once."""
    sd, out = dict(sd), {}
    for leaf in ("weight", "bias"):
        def take(name: str, leaf: str = leaf) -> torch.Tensor | None:
            return sd.pop(f"{name}.{leaf}", None)

        for src, dst in _TOP.items():
            out[f"{dst}.{leaf}"] = take(src)
        scale, shift = take("norm_out.linear").chunk(2)  # diffusers (scale, shift); Tencent (shift, scale)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
        for i in range(config["num_layers"]):
            d = f"transformer_blocks.{i}."
            out[f"double_blocks.{i}.img_attn_qkv.{leaf}"] = torch.cat([take(d + f"attn.to_{n}") for n in "qkv"])
            out[f"double_blocks.{i}.txt_attn_qkv.{leaf}"] = torch.cat([take(d + f"attn.add_{n}_proj") for n in "qkv"])
            for src, dst in _DOUBLE.items():
                if (t := take(d + src)) is not None:
                    out[f"double_blocks.{i}.{dst}.{leaf}"] = t
        for i in range(config["num_single_layers"]):
            d = f"single_transformer_blocks.{i}."
            out[f"single_blocks.{i}.linear1.{leaf}"] = torch.cat([take(d + n) for n in
                                                                  ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
            for src, dst in _SINGLE.items():
                if (t := take(d + src)) is not None:
                    out[f"single_blocks.{i}.{dst}.{leaf}"] = t
        for i in range(config["num_refiner_layers"]):
            d = f"context_embedder.token_refiner.refiner_blocks.{i}."
            o = f"txt_in.individual_token_refiner.blocks.{i}."
            out[f"{o}self_attn_qkv.{leaf}"] = torch.cat([take(d + f"attn.to_{n}") for n in "qkv"])
            for src, dst in _REFINER.items():
                out[f"{o}{dst}.{leaf}"] = take(d + src)
    assert not sd, sorted(sd)[:5]
    return {k: v.clone().contiguous() for k, v in out.items() if v is not None}


def original_vae(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKLHunyuanImage's weights in Tencent's names (kohya's library/hunyuan_image_vae.py)."""
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    resampled = int(np.log2(config["spatial_compression_ratio"]))
    names: dict[str, str] = {}
    for side, level, per_level, kind in (("encoder", "down", layers, "downsample"),
                                         ("decoder", "up", layers + 1, "upsample")):
        n = 0
        for i in range(levels):
            for j in range(per_level):
                names[f"{side}.{level}_blocks.{n}."], n = f"{side}.{level}.{i}.block.{j}.", n + 1
            if i < resampled and i != levels - 1:
                names[f"{side}.{level}_blocks.{n}."], n = f"{side}.{level}.{i}.{kind}.", n + 1
        names[f"{side}.mid_block.resnets.0."] = f"{side}.mid.block_1."
        names[f"{side}.mid_block.resnets.1."] = f"{side}.mid.block_2."
        names[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
    out = {}
    for key, tensor in sd.items():
        for src, dst in names.items():
            if key.startswith(src):
                rest = key[len(src):].replace("conv_shortcut", "nin_shortcut")
                if dst.endswith("attn_1."):
                    rest = re.sub(r"^to_(q|k|v)\.", r"\1.", rest).replace("proj.", "proj_out.")
                key = dst + rest
                break
        out[key] = tensor.clone().contiguous()
    return out


def _old_qwen_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's Qwen2.5-VL names -> the older ones in kohya's --text_encoder file (model.*, visual.*)."""
    out = {}
    for key, tensor in sd.items():
        key = key.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        out[key] = tensor.clone().contiguous()
    return out


@pytest.fixture(scope="module")
def kohya(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import diffusers

    root = tmp_path_factory.mktemp("hunyuan-files")
    folder = build_tiny_hunyuan(root / "model")
    # kohya's Qwen2.5-VL config has RMS eps 1e-6 (the 7B's), which no tensor shape tells; the tiny one takes it
    te_config = folder / "text_encoder" / "config.json"
    config = json.loads(te_config.read_text())
    config["text_config"]["rms_norm_eps"] = config["rms_norm_eps"] = 1e-6
    te_config.write_text(json.dumps(config))
    pipe = diffusers.HunyuanImagePipeline.from_pretrained(str(folder), dtype=FP32)
    byt5 = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if k != "encoder.embed_tokens.weight"}
    files = {
        "dit": original_dit(pipe.transformer.state_dict(), dict(pipe.transformer.config)),
        "text_encoder": _old_qwen_names(pipe.text_encoder.state_dict()),
        "byt5": {k: v.clone().contiguous() for k, v in byt5.items()},
        "vae": original_vae(pipe.vae.state_dict(), dict(pipe.vae.config)),
    }
    for name, state in files.items():
        save_file(state, str(root / f"{name}.safetensors"))
    cache = root / "tokenizers"  # kohya's --tokenizer_cache_dir layout
    pipe.tokenizer.save_pretrained(str(cache / hunyuan_files.QWEN_TOKENIZER.replace("/", "_")))
    parts = {name: str(root / f"{name}.safetensors") for name in hunyuan_files.KOHYA_PARTS}
    return {"folder": folder, "file": root / "dit.safetensors", "parts": {**parts, "tokenizer_cache_dir": str(cache)},
            "keys": files}


@pytest.fixture(scope="module")
def loaded(kohya: dict) -> tuple:
    # the file through the evaluator's own loader: the family's branch of pipeline_loading picks load_hunyuan
    pipes = (pl.load_pipeline(str(kohya["file"]), False, torch.device("cpu"), family="hunyuan_image",
                              parts=kohya["parts"]),
             hunyuan_files.load_hunyuan(str(kohya["folder"]), {}, FP32))
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


def test_the_dit_file_has_kohyas_module_names(kohya: dict) -> None:
    """Every module kohya's LoRA file (written by kohya's own network code on its DiT blocks) names is a weight of
    the hand-written DiT file: the reverse conversion uses kohya's names."""
    lines = (FIXTURE / "keys.txt").read_text().splitlines()
    modules = {line.split("\t")[0].removeprefix("lora_unet_").split(".")[0] for line in lines
               if line.startswith("lora_unet_")}
    weights = {k.removesuffix(".weight").replace(".", "_") for k in kohya["keys"]["dit"] if k.endswith(".weight")}
    assert modules and modules <= weights, sorted(modules - weights)[:5]


def test_components_and_transformer_match_the_folders(loaded: tuple) -> None:
    assembled, folder = loaded
    assert type(assembled) is type(folder) and type(folder).__name__ == "HunyuanImagePipeline"
    assert set(assembled.components) == set(folder.components)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
                 "guider", "ocr_guider"):
        assert type(assembled.components[name]) is type(folder.components[name]), name
    configs = [{k: list(v) if isinstance(v, tuple | list) else v for k, v in p.transformer.config.items()
                if not k.startswith("_")} for p in loaded]
    assert configs[0] == configs[1]
    for name in ("guider", "ocr_guider"):  # kohya's sampler values, which the tiny folder carries too
        a, b = (getattr(p, name) for p in loaded)
        assert (a.guidance_scale, a.adaptive_projected_guidance_start_step) == \
            (b.guidance_scale, b.adaptive_projected_guidance_start_step)
    assert assembled.scheduler.config.shift == folder.scheduler.config.shift == 5.0
    gen = torch.Generator().manual_seed(0)
    width = assembled.transformer.config.text_embed_dim
    inputs = {"hidden_states": torch.randn(1, 64, 8, 8, generator=gen), "timestep": torch.tensor([500.0]),
              "encoder_hidden_states": torch.randn(1, 7, width, generator=gen),
              "encoder_attention_mask": torch.ones(1, 7, dtype=torch.long),
              "encoder_hidden_states_2": torch.randn(1, 5, assembled.text_encoder_2.config.d_model, generator=gen),
              "encoder_attention_mask_2": torch.ones(1, 5, dtype=torch.long)}
    with torch.no_grad():
        a, b = (p.transformer(**inputs, return_dict=False)[0] for p in loaded)
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_text_encoders_vae_and_tokenizers_match_the_folders(loaded: tuple) -> None:
    assembled, folder = loaded
    text = 'a woman wearing a blue coat that says "hello"'
    with torch.no_grad():
        ids = [p.tokenizer(text, return_tensors="pt") for p in loaded]
        assert torch.equal(ids[0].input_ids, ids[1].input_ids)
        out = [p.text_encoder(**ids[0], output_hidden_states=True).hidden_states for p in loaded]
        assert len(out[0]) == len(out[1]) and all(torch.equal(x, y) for x, y in zip(*out, strict=True))
        ids_2 = [p.tokenizer_2(text, return_tensors="pt").input_ids for p in loaded]
        assert torch.equal(*ids_2)
        byt5 = [p.text_encoder_2(ids_2[0]).last_hidden_state for p in loaded]
        assert torch.equal(*byt5) and byt5[0].abs().sum() > 0
        image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        latents = [p.vae.encode(image).latent_dist.mean for p in loaded]
        assert torch.equal(*latents)
        assert torch.equal(*(p.vae.decode(latents[0]).sample for p in loaded))


def test_assembled_pipeline_generates_the_folders_images(loaded: tuple, tmp_path: Path) -> None:
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2)
    images = [ev.Evaluator(p, PROMPTS, cfg, tmp_path / str(i)).generate_base().images for i, p in enumerate(loaded)]
    pixels = [[np.asarray(im, dtype=np.float64) for im in ims] for ims in images]
    assert len(pixels[0]) == 2 and all(np.array_equal(a, b) for a, b in zip(*pixels, strict=True))
    assert pixels[0][0].shape == (64, 64, 3) and pixels[0][0].std() > 0


@pytest.mark.parametrize(
    ("drop", "change", "message"),
    [
        (("byt5",), {}, r"kohya's --byt5 must be given too"),
        (("text_encoder", "vae"), {}, r"kohya's --text_encoder, --vae must be given too"),
        ((), {"vae": "nowhere/vae.safetensors"}, r"kohya's --vae file nowhere/vae.safetensors does not exist"),
        ((), {"vae": "BYT5"}, r"not a HunyuanImage VAE \(kohya's --vae\)"),
        ((), {"byt5": "VAE"}, r"not a ByT5 encoder \(kohya's --byt5\)"),
        ((), {"text_encoder": "BYT5"}, r"not a Qwen2.5-VL text encoder \(kohya's --text_encoder\)"),
    ],
)
def test_missing_or_wrong_files_fail_in_one_line(kohya: dict, drop: tuple, change: dict, message: str) -> None:
    named = {"BYT5": kohya["parts"]["byt5"], "VAE": kohya["parts"]["vae"]}
    parts = {k: named.get(v, v) for k, v in {**kohya["parts"], **change}.items() if k not in drop}
    with pytest.raises(UserError, match=message) as err:
        hunyuan_files.load_hunyuan(str(kohya["file"]), parts, FP32)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ("folder_transformer", r"diffusers' layout; set \[eval\] base_model to the diffusers folder"),
        ("vae", r"not a HunyuanImage 2.1 DiT in Tencent's layout .* --pretrained_model_name_or_path"),
    ],
)
def test_a_wrong_dit_file_fails_in_one_line(kohya: dict, base: str, message: str) -> None:
    path = (kohya["folder"] / "transformer" / "diffusion_pytorch_model.safetensors" if base == "folder_transformer"
            else kohya["parts"][base])
    with pytest.raises(UserError, match=message) as err:
        hunyuan_files.load_hunyuan(str(path), kohya["parts"], FP32)
    assert "\n" not in str(err.value)


def test_an_sft_file_is_read_as_safetensors(kohya: dict, tmp_path: Path) -> None:
    sft = tmp_path / "byt5.sft"
    sft.write_bytes(Path(kohya["parts"]["byt5"]).read_bytes())
    model = hunyuan_files.load_byt5(sft, FP32)
    assert torch.equal(model.shared.weight, kohya["keys"]["byt5"]["shared.weight"])


def test_a_pickle_file_is_refused(kohya: dict, tmp_path: Path) -> None:
    pickle = tmp_path / "qwen.pt"
    pickle.write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"only \.safetensors model files are loaded"):
        hunyuan_files.load_hunyuan(str(kohya["file"]), {**kohya["parts"], "text_encoder": str(pickle)}, FP32)


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        ({}, {"num_attention_heads": 28, "attention_head_dim": 128, "num_layers": 2, "num_single_layers": 1,
              "num_refiner_layers": 2, "mlp_ratio": 4.0, "text_embed_dim": 3584, "text_embed_2_dim": 1472,
              "rope_axes_dim": (64, 64), "in_channels": 64, "out_channels": 64, "patch_size": (1, 1)}),
        ({"img_in.proj.weight": (64, 16, 2, 2), "final_layer.linear.weight": (64, 3584)},
         {"in_channels": 16, "out_channels": 16, "patch_size": (2, 2)}),
    ],
)
def test_transformer_config_from_original_shapes(shapes: dict, expected: dict) -> None:
    base = {"img_in.proj.weight": (3584, 64, 1, 1), "final_layer.linear.weight": (64, 3584),
            "double_blocks.0.img_attn_q_norm.weight": (128,), "double_blocks.0.img_mlp.fc1.weight": (14336, 3584),
            "double_blocks.1.img_attn_qkv.weight": (1,), "single_blocks.0.linear1.weight": (1,),
            "txt_in.input_embedder.weight": (3584, 3584), "byt5_in.fc1.weight": (2048, 1472),
            "txt_in.individual_token_refiner.blocks.0.norm1.weight": (1,),
            "txt_in.individual_token_refiner.blocks.1.norm1.weight": (1,)}
    state = {k: torch.empty(s, device="meta") for k, s in {**base, **shapes}.items()}
    config = hunyuan_files.transformer_config(state, Path("dit.safetensors"))
    assert {k: config[k] for k in expected} == expected


def _meta(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def test_qwen_config_from_the_7b_shapes() -> None:
    """Qwen2.5-VL-7B as kohya's --text_encoder file holds it: 28 layers of width 3584, 28 query and 4 key/value heads
    of 128, a 32-block vision tower of 1280 (16 heads of 80) merged into 3584."""
    lm = "model.language_model."
    state = _meta({lm + "embed_tokens.weight": (152064, 3584), lm + "layers.0.self_attn.q_proj.weight": (3584, 3584),
                   lm + "layers.0.self_attn.k_proj.weight": (512, 3584),
                   lm + "layers.0.mlp.gate_proj.weight": (18944, 3584),
                   **{f"{lm}layers.{i}.input_layernorm.weight": (3584,) for i in range(28)},
                   "model.visual.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
                   **{f"model.visual.blocks.{i}.norm1.weight": (1280,) for i in range(32)},
                   "model.visual.blocks.0.mlp.gate_proj.weight": (3420, 1280),
                   "model.visual.merger.mlp.2.weight": (3584, 5120), "lm_head.weight": (152064, 3584)})
    config = hunyuan_files.qwen_config(hunyuan_files.qwen_state(
        {k.replace(lm, "model.").replace("model.visual.", "visual."): v for k, v in state.items()}))
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size, text.vocab_size, text.rms_norm_eps) == (3584, 28, 28, 4, 18944, 152064, 1e-6)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and text.rope_parameters["rope_theta"] == 1e6
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.out_hidden_size, vision.patch_size,
            vision.temporal_patch_size) == (32, 1280, 16, 3584, 14, 2)
    assert config.tie_word_embeddings is False and text.eos_token_id == 151645


def test_vae_config_from_the_2_1_shapes() -> None:
    channels = (128, 256, 512, 512, 1024, 1024)
    shapes = {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (1024, 64, 3, 3),
              "decoder.conv_out.weight": (3, 128, 3, 3)}
    for i, c in enumerate(channels):
        shapes.update({f"encoder.down.{i}.block.{j}.conv1.weight": (c, c, 3, 3) for j in range(2)})
        if i < 5:
            shapes[f"encoder.down.{i}.downsample.conv.weight"] = (1, 1, 3, 3)
    config = hunyuan_files.vae_config(_meta(shapes))
    assert config == {"in_channels": 3, "out_channels": 3, "latent_channels": 64, "block_out_channels": channels,
                      "layers_per_block": 2, "spatial_compression_ratio": 32, "sample_size": 384,
                      "scaling_factor": 0.75289}
