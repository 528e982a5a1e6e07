"""Lumina 2 assembled from the files kohya's lumina_train_network.py takes (lumina_files.py): the tiny Lumina 2 of
tests/lumina_model.py saved as a diffusers folder and rewritten by hand in kohya's layouts: the NextDiT in
Alpha-VLLM's names (fused qkv), Gemma 2 under Gemma2ForCausalLM's `model.` with its tied lm_head, FLUX's AE in BFL's
layout, the tokenizer in a hub cache given as --tokenizer_cache_dir; or all three models in one Neta-Lumina file.
The assembled pipeline's models compute exactly what the folder's do and it generates the same images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_monitor.config import EvalConfig
from lora_monitor.errors import UserError
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import lumina_files
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.prompts import Prompt
from tests.evaluation.test_evaluator_flux import ldm_vae
from tests.lumina_model import build_tiny_lumina

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

CPU = torch.device("cpu")
F32 = torch.float32
PROMPTS = [Prompt("a photo of a red dress"), Prompt("a woman wearing a blue coat", seed=11)]
# diffusers' Lumina2Transformer2DModel -> Alpha-VLLM's NextDiT names (kohya's lumina_models), applied in order
_RENAMES = [
    ("time_caption_embed.timestep_embedder.linear_1.", "t_embedder.mlp.0."),
    ("time_caption_embed.timestep_embedder.linear_2.", "t_embedder.mlp.2."),
    ("time_caption_embed.caption_embedder.", "cap_embedder."),
    ("norm_out.linear_1.", "final_layer.adaLN_modulation.1."),
    ("norm_out.linear_2.", "final_layer.linear."),
    (".attn.norm_q.", ".attention.q_norm."), (".attn.norm_k.", ".attention.k_norm."),
    (".attn.to_out.0.", ".attention.out."),
    (".feed_forward.linear_1.", ".feed_forward.w1."), (".feed_forward.linear_2.", ".feed_forward.w2."),
    (".feed_forward.linear_3.", ".feed_forward.w3."),
    (".norm1.linear.", ".adaLN_modulation.1."), (".norm1.norm.", ".attention_norm1."),
    (".norm1.", ".attention_norm1."), (".norm2.", ".attention_norm2."),
]


def nextdit(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' Lumina 2 transformer weights in Alpha-VLLM's layout; every tensor used exactly once."""
    sd = dict(sd)
    out = {}
    for key in [k for k in sd if k.endswith(".attn.to_q.weight")]:
        stem = key.removesuffix("to_q.weight")
        out[stem.replace(".attn.", ".attention.") + "qkv.weight"] = torch.cat(
            [sd.pop(f"{stem}to_{n}.weight") for n in "qkv"])
    for key, tensor in sd.items():
        name = key
        for src, dst in _RENAMES:
            if src in name:
                name = name.replace(src, dst)
                break
        out[name] = tensor
    out["norm_final.weight"] = torch.ones(out["x_embedder.weight"].shape[0])  # kohya's NextDiT has it, unused
    return out


def hub_cache(pipe: object, root: Path) -> Path:
    """The pipeline's tokenizer (and its Gemma's config.json, which AutoTokenizer reads as kohya's does) saved as the
    hub cache holds google/gemma-2-2b: kohya's --tokenizer_cache_dir is a cache_dir."""
    repo = root / ("models--" + lumina_files.GEMMA_TOKENIZER.replace("/", "--"))
    commit = "0" * 40
    pipe.tokenizer.save_pretrained(str(repo / "snapshots" / commit))
    pipe.text_encoder.config.save_pretrained(str(repo / "snapshots" / commit))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return root


@pytest.fixture(scope="module", params=["separate", "neta"])
def kohya(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`separate`: the NextDiT, Gemma 2 (Gemma2ForCausalLM's names) and AE each a file, as kohya's guide has them.
    `neta`: one Neta-Lumina file with all three under their prefixes, given for every argument."""
    from diffusers import Lumina2Pipeline

    root = tmp_path_factory.mktemp(f"lumina-files-{request.param}")
    folder = build_tiny_lumina(root / "model")
    pipe = Lumina2Pipeline.from_pretrained(str(folder))
    dit = nextdit(pipe.transformer.state_dict())
    gemma = {f"model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    ae = ldm_vae(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))
    cache = hub_cache(pipe, root / "tokenizers")
    if request.param == "neta":
        state = {**{f"model.diffusion_model.{k}": v for k, v in dit.items()},
                 **{f"text_encoders.gemma2_2b.transformer.{k}": v for k, v in gemma.items()},
                 "text_encoders.gemma2_2b.logit_scale": torch.tensor(1.0),
                 **{f"vae.{k}": v for k, v in ae.items()}}
        file = root / "neta-lumina.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(file))
        parts = {"gemma2": str(file), "ae": str(file)}
    else:
        gemma["lm_head.weight"] = pipe.text_encoder.embed_tokens.weight  # tied to the embedding, as Gemma 2's
        files = {"lumina": dit, "gemma2": gemma, "ae": ae}
        for name, state in files.items():
            save_file({k: v.clone().contiguous() for k, v in state.items()}, str(root / f"{name}.safetensors"))
        file = root / "lumina.safetensors"
        parts = {"gemma2": str(root / "gemma2.safetensors"), "ae": str(root / "ae.safetensors")}
    return {"folder": folder, "file": file, "parts": {**parts, "tokenizer_cache_dir": str(cache)}, "root": root}


def _ready(pipe: object) -> object:
    pipe.set_progress_bar_config(disable=True)
    pl.place_pipeline(pipe, CPU)
    return pipe


@pytest.fixture(scope="module")
def loaded(kohya: dict) -> tuple:
    # the file through the evaluator's own loader: the family's branch of pipeline_loading picks load_lumina
    assembled = pl.load_pipeline(str(kohya["file"]), False, CPU, family="lumina", parts=kohya["parts"])
    return assembled, _ready(lumina_files.load_lumina(str(kohya["folder"]), {}, F32))


def test_same_pipeline_and_components_as_the_folders(loaded: tuple) -> None:
    assembled, folder = loaded
    assert type(assembled) is type(folder) and type(folder).__name__ == "Lumina2Pipeline"
    assert {k: type(v) for k, v in assembled.components.items()} == {k: type(v) for k, v in folder.components.items()}
    assert assembled.scheduler.config.shift == folder.scheduler.config.shift == 6.0
    for slot in ("transformer", "text_encoder", "vae"):
        a, b = (getattr(p, slot).state_dict() for p in loaded)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), slot


def test_transformer_output_matches_the_folders(loaded: tuple) -> None:
    assembled, folder = loaded
    # all but the sizes no tensor fixes (sample_size) or many values give (the FFN's multiple_of / multiplier)
    configs = [{k: tuple(v) if isinstance(v, tuple | list) else v for k, v in p.transformer.config.items()
                if not k.startswith("_") and k not in ("sample_size", "multiple_of", "ffn_dim_multiplier")}
               for p in loaded]
    assert configs[0] == configs[1]
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, :7], mask[1, :12] = True, True
    inputs = {"hidden_states": torch.randn(2, 16, 8, 8, generator=gen), "timestep": torch.tensor([0.3, 0.8]),
              "encoder_hidden_states": torch.randn(2, 12, 32, generator=gen), "encoder_attention_mask": mask}
    with torch.no_grad():
        a, b = (p.transformer(**inputs).sample for p in loaded)
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_text_encoder_and_tokenizer_match_the_folders(loaded: tuple) -> None:
    assembled, folder = loaded
    text = "You are an assistant designed to generate superior images. <Prompt Start> a woman wearing a blue coat"
    tokens = [p.tokenizer(text, padding="max_length", max_length=256, truncation=True, return_tensors="pt")
              for p in loaded]
    assert torch.equal(tokens[0].input_ids, tokens[1].input_ids)
    mask = tokens[0].attention_mask.bool()
    with torch.no_grad():
        out = [p.text_encoder(tokens[0].input_ids, attention_mask=tokens[0].attention_mask,
                              output_hidden_states=True).hidden_states[-2] for p in (assembled, folder)]
    # the pipeline reads the prompt's tokens only; padding past kohya's 4096-token sliding window is never read
    assert torch.equal(out[0][mask], out[1][mask]) and out[0][mask].abs().sum() > 0


def test_assembled_pipeline_generates_the_folders_images(loaded: tuple, tmp_path: Path) -> None:
    cfg = EvalConfig(device="cpu", steps=2, width=64, height=64, batch_size=2)
    images = [ev.Evaluator(p, PROMPTS, cfg, tmp_path / str(i)).generate_base().images for i, p in enumerate(loaded)]
    pixels = [[np.asarray(im, dtype=np.float64) for im in ims] for ims in images]
    assert len(pixels[0]) == 2 and pixels[0][0].shape == (64, 64, 3)
    assert all(np.array_equal(a, b) for a, b in zip(*pixels, strict=True))


@pytest.mark.parametrize("kohya", ["separate"], indirect=True)
@pytest.mark.parametrize(
    ("drop", "change", "message"),
    [
        (("gemma2",), {}, r"kohya's --gemma2 must be given too"),
        (("gemma2", "ae"), {}, r"kohya's --gemma2, --ae must be given too"),
        ((), {"ae": "nowhere/ae.safetensors"}, r"kohya's --ae file nowhere/ae.safetensors does not exist"),
        ((), {"ae": "GEMMA2"}, r"not FLUX's autoencoder \(kohya's --ae\)"),
        ((), {"gemma2": "AE"}, r"not a Gemma 2 text encoder \(kohya's --gemma2\)"),
        ((), {"gemma2": "LUMINA"}, r"not a Gemma 2 text encoder \(kohya's --gemma2\)"),
        ((), {"tokenizer_cache_dir": "EMPTY"}, r"tokenizer google/gemma-2-2b could not be loaded .*--cache-dir"),
        ((), {"gemma2": "NARROW"}, r"a Gemma 2 of width 16, but the transformer .* width 32; check kohya's --gemma2"),
    ],
)
def test_missing_or_wrong_files_fail_in_one_line(kohya: dict, drop: tuple, change: dict, message: str) -> None:
    from transformers import Gemma2Config, Gemma2Model

    (kohya["root"] / "empty").mkdir(exist_ok=True)
    narrow = Gemma2Model(Gemma2Config(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=1, num_key_value_heads=1, head_dim=16))
    save_file(narrow.state_dict(), str(kohya["root"] / "narrow.safetensors"))
    named = {"GEMMA2": kohya["parts"]["gemma2"], "AE": kohya["parts"]["ae"], "LUMINA": str(kohya["file"]),
             "EMPTY": str(kohya["root"] / "empty"), "NARROW": str(kohya["root"] / "narrow.safetensors")}
    parts = {k: named.get(v, v) for k, v in {**kohya["parts"], **change}.items() if k not in drop}
    with pytest.raises(UserError, match=message) as err:
        lumina_files.load_lumina(str(kohya["file"]), parts, F32)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kohya", ["separate"], indirect=True)
@pytest.mark.parametrize(("base", "message"), [
    ("transformer/diffusion_pytorch_model.safetensors", r"diffusers' layout; set \[eval\] base_model to the diffusers"),
    ("ae.safetensors", r"not a Lumina 2 NextDiT .*--pretrained_model_name_or_path"),
])
def test_a_wrong_transformer_file_fails_in_one_line(kohya: dict, base: str, message: str) -> None:
    path = (kohya["folder"] if base.startswith("transformer/") else kohya["root"]) / base
    with pytest.raises(UserError, match=message) as err:
        lumina_files.load_lumina(str(path), kohya["parts"], F32)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [  # Lumina-Image-2.0's NextDiT as kohya builds it (NextDiT_2B_GQA_patch2_Adaln_Refiner)
        ({}, {"hidden_size": 2304, "num_attention_heads": 24, "num_kv_heads": 8, "axes_dim_rope": (32, 32, 32),
              "in_channels": 16, "out_channels": None, "cap_feat_dim": 2304, "num_layers": 2,
              "num_refiner_layers": 1, "ffn_dim_multiplier": None}),
        ({"x_embedder.weight": (64, 64), "layers.0.attention.q_norm.weight": (32,),
          "layers.0.attention.qkv.weight": (128, 64), "layers.0.feed_forward.w1.weight": (256, 64),
          "cap_embedder.1.weight": (64, 32), "final_layer.linear.weight": (64, 64)},
         {"hidden_size": 64, "num_attention_heads": 2, "num_kv_heads": 1, "axes_dim_rope": (8, 12, 12),
          "cap_feat_dim": 32}),
        ({"layers.0.feed_forward.w1.weight": (6144, 2304)}, {"multiple_of": 6144, "ffn_dim_multiplier": 6144 / 9216}),
    ],
)
def test_transformer_config_from_nextdit_shapes(shapes: dict, expected: dict) -> None:
    from diffusers import Lumina2Transformer2DModel

    base = {"x_embedder.weight": (2304, 64), "layers.0.attention.q_norm.weight": (96,),
            "layers.0.attention.qkv.weight": (3840, 2304), "layers.0.feed_forward.w1.weight": (9216, 2304),
            "cap_embedder.1.weight": (2304, 2304), "final_layer.linear.weight": (64, 2304),
            "layers.1.attention_norm1.weight": (1,), "noise_refiner.0.attention_norm1.weight": (1,)}
    state = {k: torch.empty(s, device="meta") for k, s in {**base, **shapes}.items()}
    config = lumina_files.transformer_config(state, Path("lumina.safetensors"))
    assert {k: config[k] for k in expected} == expected
    with torch.device("meta"):  # the FFN built from the config is as wide as the file's
        model = Lumina2Transformer2DModel(**config)
    ffn = model.layers[0].feed_forward.linear_1.weight
    assert tuple(ffn.shape) == tuple(state["layers.0.feed_forward.w1.weight"].shape)


@pytest.mark.parametrize(
    ("q", "k", "expected"),
    [((2048, 2304), (1024, 2304), (8, 4, 256)),  # google/gemma-2-2b, as kohya's GEMMA2_CONFIG
     ((32, 32), (16, 32), (2, 1, 16))],  # the tiny test model: one key/value head
)
def test_gemma2_heads_from_shapes(q: tuple, k: tuple, expected: tuple) -> None:
    state = {"embed_tokens.weight": torch.empty(100, q[1], device="meta"),
             "layers.0.self_attn.q_proj.weight": torch.empty(q, device="meta"),
             "layers.0.self_attn.k_proj.weight": torch.empty(k, device="meta"),
             "layers.0.mlp.gate_proj.weight": torch.empty(64, q[1], device="meta")}
    config = lumina_files.gemma2_config(state, Path("gemma2.safetensors"))
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == expected
    assert config["query_pre_attn_scalar"] == expected[2] and config["hidden_size"] == q[1]


def test_full_size_nextdit_converts_to_every_diffusers_tensor() -> None:
    """Lumina-Image-2.0's NextDiT (26 layers, 2 refiners of each kind, 2304 wide, 24 heads, 8 key/value heads) in
    kohya's names, on the meta device: converted, it fills every tensor of diffusers' model of that size, in shape."""
    from diffusers import Lumina2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_lumina2_to_diffusers

    with torch.device("meta"):
        model = Lumina2Transformer2DModel(cap_feat_dim=2304)
    state = nextdit(model.state_dict())
    config = lumina_files.transformer_config(state, Path("lumina-image-2.safetensors"))
    assert {k: config[k] for k in ("num_layers", "num_refiner_layers", "axes_dim_rope")} == \
        {"num_layers": 26, "num_refiner_layers": 2, "axes_dim_rope": (32, 32, 32)}
    converted = convert_lumina2_to_diffusers(lumina_files.split_fused(state, config))
    want = model.state_dict()
    assert converted.keys() == want.keys()
    assert all(converted[k].shape == want[k].shape for k in want)
