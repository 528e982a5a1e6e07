"""A tiny FLUX.1 pipeline (random weights) built offline from diffusers' and transformers' configs.

The same layout as FLUX.1 — a FluxTransformer2DModel with a guidance embedding, a 16-channel-style autoencoder
without quant convs, CLIP-L and T5 text encoders, the flow-matching scheduler with FLUX.1-dev's settings — at
hidden sizes of 32, so the whole evaluation and training loop runs on a CPU in seconds. Its transformer and
CLIP-L have the shapes of kohya's tiny FLUX in tests/fixtures/kohya-families/flux/model.json, so kohya's own
LoRA file of that fixture applies to it.

No hub access: the CLIP tokenizer is rebuilt from open_clip's BPE table (tokenizer.py); the T5 tokenizer is a
Unigram model over a small English word list, saved as a T5TokenizerFast (ids: 0 pad, 1 </s>, 2 unknown, as T5's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_monitor.demo.tokenizer import build_clip_tokenizer

# kohya's tiny FLUX (fixture model.json): hidden 32 = 2 heads of 16, rotary split 4 + 6 + 6, 1 + 1 blocks
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
CLIP_CONFIG: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "max_position_embeddings": 77, "projection_dim": 32, "hidden_act": "quick_gelu",
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,  # eos 2: pooled at the highest id, as CLIP-L's config
}
T5_LAYERS = {"d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2, "feed_forward_proj": "gated-gelu",
             "relative_attention_num_buckets": 8, "relative_attention_max_distance": 128}  # T5's own distance
SCHEDULER_CONFIG = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                    "base_image_seq_len": 256, "max_image_seq_len": 4096}  # FLUX.1-dev's
T5_MAX_TOKENS = 64  # the tiny T5's tokenizer limit: the evaluator then encodes 64 tokens, not FLUX.1-dev's 512
_WORDS = ("a an the of on in with and photo picture image model person woman man wearing red blue green black "
          "white yellow pink dress shirt coat jacket skirt trousers hat studio background plain light dark street "
          "close up full body portrait fashion garment fabric silk cotton wool sleeve collar").split()


def _t5_vocab() -> list[tuple[str, float]]:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"▁{w}", -1.0) for w in _WORDS] + [("▁", -4.0)]
    return vocab + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.'-"]


def build_t5_tokenizer(dir: Path) -> Path:
    """Write a small T5TokenizerFast folder to `dir` (Unigram over _WORDS plus single letters) and return it."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram(_t5_vocab(), unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                extra_ids=0, model_max_length=T5_MAX_TOKENS)
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(dir))
    return dir


def make_models(transformer: dict[str, Any] | None = None, clip: dict[str, Any] | None = None
                ) -> dict[str, torch.nn.Module]:
    """Random-weight transformer, VAE, CLIP-L and T5 of the tiny FLUX (`transformer`, `clip` override configs)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    config = {**TRANSFORMER_CONFIG, **(transformer or {})}
    latent = config["in_channels"] // 4  # FLUX packs 2x2 latent patches into the transformer's channels
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent, block_out_channels=(32, 32),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159, sample_size=64)
    t5 = T5EncoderModel(T5Config(vocab_size=len(_t5_vocab()), d_model=config["joint_attention_dim"], **T5_LAYERS,
                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return {
        "transformer": FluxTransformer2DModel(**config),
        "vae": vae,
        "text_encoder": CLIPTextModel(CLIPTextConfig(**{**CLIP_CONFIG, **(clip or {})})),
        "text_encoder_2": t5,
    }


def build_tiny_flux(dir: Path, seed: int = 0, transformer: dict[str, Any] | None = None,
                    clip: dict[str, Any] | None = None, vae: torch.nn.Module | None = None) -> Path:
    """Write a tiny FLUX.1 diffusers folder to `dir` and return `dir`. Same `seed` -> same weights.

    Loadable with `FluxPipeline.from_pretrained(dir)`; generates at any multiple of 4 px (VAE scale 2, 2x2 packing).
    `vae`: an AutoencoderKL with `transformer`'s in_channels / 4 latent channels instead of the random one (the
    demo's near-identity VAE, so what the transformer learns can be seen in pixels).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    dir = Path(dir)
    clip_tokenizer = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer(dir / "tokenizer")))
    t5_tokenizer = T5TokenizerFast.from_pretrained(str(build_t5_tokenizer(dir / "tokenizer_2")))
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        models = make_models(transformer, clip)
    if vae is not None:
        models["vae"] = vae
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), tokenizer=clip_tokenizer,
                        tokenizer_2=t5_tokenizer, **models)
    pipe.save_pretrained(str(dir), safe_serialization=True)
    return dir
