"""Anima assembled from the files kohya's anima_train_network.py takes (anima_files.py): the tiny Anima of
tests/anima_model.py saved as a diffusers folder and written by hand in kohya's layouts (the DiT in NVIDIA's Cosmos
names with the LLM adapter under llm_adapter., the Qwen3 text encoder as a state dict or a folder, the Qwen-Image VAE
in diffusers' or ComfyUI's names); the assembled pipeline's models compute exactly what the folder's do and it
generates the same images."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_monitor.config import EvalConfig
from lora_monitor.errors import UserError
from lora_monitor.evaluation import anima_files
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.anima_pipeline import AnimaPipeline
from lora_monitor.evaluation.prompts import Prompt
from tests.anima_model import build_tiny_anima

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

F32 = torch.float32
PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11)]
# diffusers' CosmosTransformer3DModel -> NVIDIA's Cosmos-Predict2 names (kohya's Anima), longest first
_DIT = [("transformer_blocks.", "blocks."), ("time_embed.t_embedder.", "t_embedder.1."),
        ("time_embed.norm.", "t_embedding_norm."), ("patch_embed.proj.", "x_embedder.proj.1."),
        ("norm_out.linear_1.", "final_layer.adaln_modulation.1."),
        ("norm_out.linear_2.", "final_layer.adaln_modulation.2."), ("proj_out.", "final_layer.linear."),
        (".norm1.linear_", ".adaln_modulation_self_attn."), (".norm2.linear_", ".adaln_modulation_cross_attn."),
        (".norm3.linear_", ".adaln_modulation_mlp."), (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
        (".to_out.0.", ".output_proj."), (".to_q.", ".q_proj."), (".to_k.", ".k_proj."), (".to_v.", ".v_proj."),
        (".norm_q.", ".q_norm."), (".norm_k.", ".k_norm."), (".ff.net.0.proj.", ".mlp.layer1."),
        (".ff.net.2.", ".mlp.layer2.")]
_ROTARY = {"pos_embedder.seq": (256,), "pos_embedder.dim_spatial_range": (10,),  # buffers kohya's saves carry
           "pos_embedder.dim_temporal_range": (6,)}


def nvidia_dit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Cosmos transformer weights in kohya's (NVIDIA's) names."""
    out = {}
    for key, tensor in sd.items():
        for a, b in _DIT:
            key = key.replace(a, b)
        out[key] = tensor
    return out


def comfy_vae(sd: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """diffusers' AutoencoderKLQwenImage weights in ComfyUI's (Wan's) names, the layout kohya converts from."""
    residual = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
                "conv_shortcut": "shortcut"}
    out = {}
    for key, tensor in sd.items():
        new = {"quant_conv": "conv1", "post_quant_conv": "conv2"}.get(key.rsplit(".", 1)[0])
        if new:
            key = f"{new}.{key.rsplit('.', 1)[1]}"
        key = re.sub(r"^(\w+)\.conv_in\.", r"\1.conv1.", key)
        key = re.sub(r"^(\w+)\.norm_out\.", r"\1.head.0.", key)
        key = re.sub(r"^(\w+)\.conv_out\.", r"\1.head.2.", key)
        key = key.replace("mid_block.attentions.0.", "middle.1.")
        key = re.sub(r"mid_block\.resnets\.(\d)\.", lambda m: f"middle.{2 * int(m[1])}.", key)
        key = key.replace("encoder.down_blocks.", "encoder.downsamples.")
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                     lambda m: f"decoder.upsamples.{(blocks + 2) * int(m[1]) + int(m[2])}.", key)
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.upsamples.{(blocks + 2) * int(m[1]) + blocks + 1}.", key)
        if re.search(r"(downsamples|upsamples|middle)\.\d+\.", key):  # a residual block's layers
            key = re.sub(r"\.(norm1|conv1|norm2|conv2|conv_shortcut)\.(\w+)$", lambda m: f".{residual[m[1]]}.{m[2]}",
                         key)
        out[key] = tensor
    return out


def _save(state: dict[str, torch.Tensor], path: Path) -> str:
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_anima(tmp_path_factory.mktemp("anima") / "model")


@pytest.fixture(scope="module", params=["files", "folders"])
def kohya(request: pytest.FixtureRequest, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`files`: ComfyUI's DiT (net. prefix, adapter inside, rotary tables), --qwen3 a CausalLM state dict (model.
    prefix, Qwen3-0.6B's tokenizer from the hub: here the folder's), --vae in diffusers' names. `folders`: the DiT
    without prefix or adapter, --llm_adapter_path the adapter, --qwen3 a transformers folder with its tokenizer."""
    root = tmp_path_factory.mktemp(f"anima-{request.param}")
    pipe = AnimaPipeline.from_pretrained(folder, F32)
    dit = nvidia_dit(pipe.transformer.state_dict())
    adapter = pipe.text_conditioner.state_dict()
    parts = {"vae": _save(pipe.vae.state_dict(), root / "vae.safetensors")}
    pipe.t5_tokenizer.save_pretrained(str(root / "t5"))
    parts["t5_tokenizer_path"] = str(root / "t5")
    if request.param == "files":
        dit.update({f"llm_adapter.{k}": v for k, v in adapter.items()})
        dit.update({k: torch.zeros(s) for k, s in _ROTARY.items()})
        dit = {f"net.{k}": v for k, v in dit.items()}
        parts["qwen3"] = _save({f"model.{k}": v for k, v in pipe.text_encoder.state_dict().items()},
                               root / "qwen3.safetensors")
    else:
        parts["llm_adapter_path"] = _save({f"llm_adapter.{k}": v for k, v in adapter.items()},
                                          root / "adapter.safetensors")
        pipe.text_encoder.save_pretrained(str(root / "qwen3"))
        pipe.tokenizer.save_pretrained(str(root / "qwen3"))
        parts["qwen3"] = str(root / "qwen3")
    return {"file": _save(dit, root / "anima.safetensors"), "parts": parts, "folder": folder, "root": root}


@pytest.fixture(scope="module")
def loaded(kohya: dict) -> tuple[AnimaPipeline, AnimaPipeline]:
    with pytest.MonkeyPatch.context() as mp:  # the hub's Qwen3-0.6B tokenizer, offline: the folder's
        mp.setattr(anima_files, "QWEN3_TOKENIZER", str(kohya["folder"] / "tokenizer"))
        # the file through the evaluator's own loader: the family's branch of pipeline_loading picks load_anima
        assembled = pl.load_pipeline(str(kohya["file"]), False, torch.device("cpu"), family="anima",
                                     parts=kohya["parts"])
    return assembled, anima_files.load_anima(str(kohya["folder"]), {}, F32)


def _config(model: torch.nn.Module) -> dict:
    return {k: list(v) if isinstance(v, tuple | list) else v for k, v in model.config.items()
            if not k.startswith("_")}


def test_same_pipeline_components_and_configs(loaded: tuple) -> None:
    assembled, folder = loaded
    assert type(assembled) is AnimaPipeline and type(assembled.full) is type(folder.full)
    assert {k: type(v) for k, v in assembled.components.items()} == {k: type(v) for k, v in folder.components.items()}
    # max_size only bounds the rotary positions: kohya's fixed 128 x 512 x 512 (the tiny folder's is smaller)
    assert {**_config(assembled.transformer), "max_size": None} == {**_config(folder.transformer), "max_size": None}
    assert _config(assembled.text_conditioner) == _config(folder.text_conditioner)
    assert _config(assembled.vae) == _config(folder.vae)
    assert assembled.scheduler.config.shift == anima_files.SAMPLE_SHIFT


def test_transformer_and_adapter_outputs_match_the_folders(loaded: tuple) -> None:
    assembled, folder = loaded
    gen = torch.Generator().manual_seed(0)
    inputs = {"hidden_states": torch.randn(1, 16, 1, 8, 8, generator=gen), "timestep": torch.tensor([0.5]),
              "encoder_hidden_states": torch.randn(1, 12, 32, generator=gen),
              "padding_mask": torch.zeros(1, 1, 8, 8)}
    source, ids = torch.randn(1, 7, 32, generator=gen), torch.randint(0, 90, (1, 9), generator=gen)
    with torch.no_grad():
        a, b = (p.transformer(**inputs).sample for p in loaded)
        c, d = (p.text_conditioner(source, ids) for p in loaded)
    assert torch.equal(a, b) and a.abs().sum() > 0
    assert torch.equal(c, d) and c.abs().sum() > 0


def test_text_encoder_and_tokenizers_match_the_folders(loaded: tuple) -> None:
    text = "a woman wearing a blue coat"
    ids = [p.tokenizer(text, return_tensors="pt").input_ids for p in loaded]
    t5 = [p.t5_tokenizer(text, return_tensors="pt").input_ids for p in loaded]
    assert torch.equal(*ids) and torch.equal(*t5) and ids[0].shape[1] > 3
    with torch.no_grad():
        out = [p.text_encoder(ids[0]).last_hidden_state for p in loaded]
    assert torch.equal(*out) and out[0].abs().sum() > 0


def test_assembled_pipeline_generates_the_folders_images(loaded: tuple, tmp_path: Path) -> None:
    assembled, folder = loaded
    for pipe in (folder.full, folder.rest):  # the same sampling schedule as kohya's (shift 3.0)
        pipe.update_components(scheduler=assembled.scheduler)
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2)
    images = []
    for i, pipe in enumerate(loaded):
        pipe.set_progress_bar_config(disable=True)
        images.append(ev.Evaluator(pipe, PROMPTS, cfg, tmp_path / str(i)).generate_base().images)
    pixels = [[np.asarray(im, dtype=np.float64) for im in ims] for ims in images]
    assert len(pixels[0]) == 2 and pixels[0][0].shape == (64, 64, 3)
    assert all(np.array_equal(a, b) for a, b in zip(*pixels, strict=True))


def test_comfyui_vae_loads_as_diffusers_names_it(tmp_path: Path) -> None:
    """ComfyUI's Qwen-Image VAE (Wan's names), shaped as kohya fixes it (two residual blocks per level, channels
    x1 x2 x4 x4), narrower."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(3)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                 temperal_downsample=[False, True, True])
    path = Path(_save(comfy_vae(vae.state_dict(), 2), tmp_path / "vae.safetensors"))
    loaded = anima_files.load_vae(path, F32)
    assert _config(loaded) == _config(vae)
    ours, theirs = loaded.state_dict(), vae.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize(
    ("kohya", "drop", "change", "message"),
    [
        ("files", ("vae",), {}, r"kohya's --vae must be given too"),
        ("files", ("qwen3", "vae"), {}, r"kohya's --qwen3, --vae must be given too"),
        ("files", (), {"vae": "nowhere/vae.safetensors"}, r"kohya's --vae nowhere/vae.safetensors does not exist"),
        ("files", (), {"vae": "QWEN3"}, r"not a Qwen-Image VAE \(kohya's --vae\)"),
        ("files", (), {"qwen3": "VAE"}, r"not a Qwen3 text encoder \(kohya's --qwen3\)"),
        ("files", (), {"t5_tokenizer_path": "VAE"}, r"kohya's --t5_tokenizer_path .* is not a folder with a tokenizer"),
        ("folders", (), {"qwen3": "nowhere/qwen3"}, r"kohya's --qwen3 nowhere/qwen3 does not exist"),
        ("folders", (), {"qwen3": "ROOT"}, r"kohya's --qwen3 folder .* holds no Qwen3 model"),
        ("folders", (), {"llm_adapter_path": "VAE"}, r"not an Anima LLM adapter \(kohya's --llm_adapter_path\)"),
    ],
    indirect=["kohya"],
)
def test_missing_or_wrong_files_fail_in_one_line(kohya: dict, drop: tuple, change: dict, message: str) -> None:
    named = {"QWEN3": kohya["parts"]["qwen3"], "VAE": kohya["parts"]["vae"], "ROOT": str(kohya["root"])}
    parts = {k: named.get(v, v) for k, v in {**kohya["parts"], **change}.items() if k not in drop}
    with pytest.raises(UserError, match=message) as err:
        anima_files.load_anima(kohya["file"], parts, F32)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kohya", ["files"], indirect=True)
def test_the_dits_own_adapter_is_used_as_kohya_does(kohya: dict, caplog: pytest.LogCaptureFixture) -> None:
    """kohya declares --llm_adapter_path but trains with the DiT file's adapter: a separate one is not used."""
    other = _save({"embed.weight": torch.zeros(3, 2)}, kohya["root"] / "other-adapter.safetensors")
    with pytest.MonkeyPatch.context() as mp, caplog.at_level("WARNING"):
        mp.setattr(anima_files, "QWEN3_TOKENIZER", str(kohya["folder"] / "tokenizer"))
        pipe = anima_files.load_anima(kohya["file"], {**kohya["parts"], "llm_adapter_path": other}, F32)
    assert pipe.text_conditioner.config.target_dim == 32
    assert "does not read --llm_adapter_path" in caplog.text


@pytest.mark.parametrize("kohya", ["folders"], indirect=True)
def test_a_dit_without_adapter_names_llm_adapter_path(kohya: dict) -> None:
    parts = {k: v for k, v in kohya["parts"].items() if k != "llm_adapter_path"}
    with pytest.raises(UserError, match=r"no LLM adapter .* give kohya's --llm_adapter_path") as err:
        anima_files.load_anima(kohya["file"], parts, F32)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kohya", ["files"], indirect=True)
def test_a_diffusers_layout_transformer_file_points_to_its_folder(kohya: dict) -> None:
    file = kohya["folder"] / "transformer" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(UserError, match="diffusers' layout; set \\[eval\\] base_model to the diffusers folder"):
        anima_files.load_anima(str(file), kohya["parts"], F32)


def test_real_anima_sizes_from_shapes() -> None:
    """kohya's fixed Anima (anima_utils.load_anima_model: 2048 wide, 28 blocks of 16 heads, adapter 1024 x 6),
    Qwen3-0.6B and its Qwen-Image VAE, built on the meta device: their configs read back from the shapes alone."""
    from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
    from transformers import Qwen3Config, Qwen3Model

    dit = {"in_channels": 16, "out_channels": 16, "num_attention_heads": 16, "attention_head_dim": 128,
           "num_layers": 28, "mlp_ratio": 4.0, "text_embed_dim": 1024, "adaln_lora_dim": 256,
           "max_size": (128, 512, 512), "patch_size": (1, 2, 2), "rope_scale": (1.0, 4.0, 4.0),
           "concat_padding_mask": True, "extra_pos_embed_type": None}
    adapter = {"source_dim": 1024, "target_dim": 1024, "model_dim": 1024, "num_layers": 6, "num_attention_heads": 16,
               "target_vocab_size": 32128, "mlp_ratio": 4.0, "use_self_attention": True, "use_layer_norm": False}
    vae = {"base_dim": 96, "z_dim": 16, "input_channels": 3, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
           "attn_scales": [], "temperal_downsample": [False, True, True]}
    qwen3 = {"vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128}
    with torch.device("meta"):
        models = {"dit": CosmosTransformer3DModel(**dit), "adapter": AnimaTextConditioner(**adapter),
                  "vae": AutoencoderKLQwenImage(**vae), "qwen3": Qwen3Model(Qwen3Config(**qwen3))}
    states = {k: m.state_dict() for k, m in models.items()}
    where = Path("anima.safetensors")
    assert anima_files.transformer_config(nvidia_dit(states["dit"]), where) == dit
    assert anima_files.adapter_config(states["adapter"], where) == adapter
    assert anima_files.vae_config(states["vae"]) == vae
    config = anima_files.qwen3_config(states["qwen3"], where)
    assert {k: getattr(config, k) for k in qwen3} == qwen3
    assert config.rope_parameters["rope_theta"] == 1_000_000.0 and config.tie_word_embeddings
