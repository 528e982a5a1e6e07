"""A tiny Anima diffusers folder (random weights), built offline, that AnimaModularPipeline loads the way a user loads
a real one: `AnimaModularPipeline.from_pretrained(dir)` then `pipe.load_components()`. Its CosmosTransformer3DModel is
the diffusers equivalent of kohya's tiny Anima DiT in tests/fixtures/kohya-families/anima/model.json (hidden 64,
2 heads, 1 block, text width 32, adaLN-LoRA 16) and its text encoder a Qwen3Model of that fixture's Qwen3Config,
so kohya's own Anima LoRA file applies to both.

Where the fixture does not fix a part it is chosen to make a working pipeline: the LLM adapter (`text_conditioner`,
an AnimaTextConditioner) maps the Qwen3 width 32 to the DiT's text width 32 in one block, embeds the T5 tokenizer's
ids (Anima reads T5 token ids there, not T5 itself) and pads its output to 512 tokens as Anima's does; the QwenImage
VAE has three temporal downsamples, so the pipeline's scale is 8 and 64 px images have 8 x 8 latents; the scheduler
shift is 1.0, kohya's default `discrete_flow_shift` for Anima. The Qwen tokenizer is transformers' own
Qwen2Tokenizer (byte-level BPE, pad and eos `<|endoftext|>`) over a small word list, the T5 one the tiny FLUX's
(lora_monitor/demo/flux_model.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from lora_monitor.demo.flux_model import _t5_vocab, build_t5_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "kohya-families" / "anima"
_ENDOFTEXT = "<|endoftext|>"
_WORDS = ("a an the of on in with and to or photo picture person woman man girl boy cat dog wearing red blue green "
          "black white dress shirt coat hat studio background plain light dark street portrait fashion anime style "
          "masterpiece best quality").split()


def _info() -> dict[str, Any]:
    return json.loads((FIXTURE / "model.json").read_text())


def build_qwen_tokenizer(dir: Path) -> Path:
    """Write a small Qwen2Tokenizer folder to `dir` (byte-level BPE learnt from `_WORDS`, each word one token) and
    return it; its ids stay below the tiny Qwen3's vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=[_ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(_WORDS), *_WORDS], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab_size = _info()["text_encoders"]["qwen3"]["Qwen3Config"]["vocab_size"]
    assert len(model["vocab"]) <= vocab_size, len(model["vocab"])
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(dir))
    return dir


def make_models() -> dict[str, torch.nn.Module]:
    """Random-weight transformer, LLM adapter, Qwen3 text encoder and VAE of the tiny Anima."""
    from diffusers import AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel
    from transformers import Qwen3Config, Qwen3Model

    info = _info()
    config = info["diffusers_equivalent"]["config"]
    qwen3 = info["text_encoders"]["qwen3"]["Qwen3Config"]
    conditioner = AnimaTextConditioner(source_dim=qwen3["hidden_size"], target_dim=config["text_embed_dim"],
                                       model_dim=32, num_layers=1, num_attention_heads=2,
                                       target_vocab_size=len(_t5_vocab()))
    vae = AutoencoderKLQwenImage(base_dim=16, z_dim=config["in_channels"], dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 attn_scales=[], temperal_downsample=[False, True, True])
    return {"transformer": CosmosTransformer3DModel(**config), "text_conditioner": conditioner,
            "text_encoder": Qwen3Model(Qwen3Config(**qwen3)), "vae": vae}


def build_tiny_anima(dir: Path, seed: int = 0) -> Path:
    """Write a tiny Anima modular-pipeline folder to `dir` (every component in its subfolder, and the
    modular_model_index.json that names them) and return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.modular_pipelines import AnimaAutoBlocks
    from transformers import Qwen2Tokenizer, T5TokenizerFast

    dir = Path(dir)
    torch.manual_seed(seed)
    models = {name: model.eval() for name, model in make_models().items()}
    with torch.no_grad():  # diffusers zero-initialises the DiT's output layers; random weights make images differ
        for p in models["transformer"].parameters():
            p.normal_(0, 0.2)
    with tempfile.TemporaryDirectory() as scratch:  # the pipeline saves them again in its own subfolders
        tokenizer = Qwen2Tokenizer.from_pretrained(str(build_qwen_tokenizer(Path(scratch) / "qwen")))
        t5_tokenizer = T5TokenizerFast.from_pretrained(str(build_t5_tokenizer(Path(scratch) / "t5")))
    pipe = AnimaAutoBlocks().init_pipeline()
    pipe.update_components(**models, tokenizer=tokenizer, t5_tokenizer=t5_tokenizer,
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0))
    pipe.save_pretrained(str(dir), overwrite_modular_index=True)
    return dir

