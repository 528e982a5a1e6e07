"""A tiny Lumina-Image-2.0-shaped diffusers pipeline (random weights), built offline: its Lumina2Transformer2DModel is
the diffusers equivalent of kohya's tiny NextDiT in tests/fixtures/kohya-families/lumina/model.json (hidden 64,
2 heads with 1 kv head, 1 layer and 1 refiner of each kind, caption width 32) and its text encoder a Gemma2Model
of that fixture's Gemma2Config, so kohya's own Lumina LoRA file applies to both.

Where the fixture does not fix a size it is chosen to make a working pipeline: Lumina2Pipeline assumes a VAE of
scale 8 (`vae_scale_factor = 8` in its code), so the 16-channel VAE has four levels and 64 px images have 8 x 8
latents (4 x 4 patches); FLUX's AE scaling and shift, as Lumina-Image-2.0 uses FLUX's AE; the scheduler shift is
6.0, kohya's default `discrete_flow_shift` and its Lumina sampler's. The Gemma tokenizer is transformers' own
GemmaTokenizer (BPE, `▁` for spaces, bos first; ids 0 pad, 1 eos, 2 bos, 3 unknown) over a small word list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "kohya-families" / "lumina"
MAX_TOKENS = 256  # the pipeline pads every prompt to max_sequence_length (256 by default)
_SPECIAL = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma's first ids
_WORDS = ("a an the of on in with and to or based you are assistant designed generate superior images image text "
          "alignment degree textual prompts prompt user start photo picture person woman man wearing red blue green "
          "black white dress shirt coat hat studio background plain light dark street portrait fashion").split()


def _info() -> dict[str, Any]:
    return json.loads((FIXTURE / "model.json").read_text())


def _gemma_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE vocabulary and merges learnt from `_WORDS` (each with and without Gemma's `▁` space mark), so every word
    is one token; any other letter or digit is a token of its own."""
    from tokenizers import Tokenizer, models, trainers

    letters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.'-<>▁")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=list(_SPECIAL), initial_alphabet=letters,
                                  show_progress=False)
    tok.train_from_iterator([w for word in _WORDS for w in (word, f"▁{word}")], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def build_gemma_tokenizer(dir: Path) -> Path:
    """Write a small Gemma tokenizer folder to `dir` (Gemma's own BPE pipeline over `_WORDS`) and return it."""
    from transformers import GemmaTokenizerFast

    vocab, merges = _gemma_vocab()
    tokenizer = GemmaTokenizerFast(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=MAX_TOKENS)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(dir))
    return dir


def make_models() -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, Lumina2Transformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    info = _info()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32,) * 4,
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159, sample_size=64)
    return {
        "transformer": Lumina2Transformer2DModel(**info["diffusers_equivalent"]["config"]),
        "vae": vae,
        "text_encoder": Gemma2Model(Gemma2Config(**info["text_encoders"]["gemma2"]["Gemma2Config"])),
    }


def build_tiny_lumina(dir: Path, seed: int = 0) -> Path:
    """Write a tiny Lumina 2 diffusers folder to `dir` and return it; Lumina2Pipeline.from_pretrained loads it and
    generates 64 px images by default (the transformer's sample_size 8 times the pipeline's scale 8)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline
    from transformers import GemmaTokenizerFast

    dir = Path(dir)
    tokenizer = GemmaTokenizerFast.from_pretrained(str(build_gemma_tokenizer(dir / "tokenizer")))
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        models = make_models()
    pipe = Lumina2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0), tokenizer=tokenizer, **models)
    pipe.save_pretrained(str(dir), safe_serialization=True)
    return dir
