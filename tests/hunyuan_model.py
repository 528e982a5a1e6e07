"""A tiny HunyuanImage-2.1-shaped diffusers pipeline (random weights), built offline: its
HunyuanImageTransformer2DModel is the diffusers equivalent of kohya's tiny double/single blocks in
tests/fixtures/kohya-families/hunyuan_image/model.json (hidden 64, 2 heads, 1 double, 1 single and 1 refiner block,
text width 32), so kohya's own HunyuanImage LoRA file applies to it.

Where the fixture does not fix a size it is chosen to make a working pipeline shaped like the real one:

- text_encoder: a Qwen2_5_VLForConditionalGeneration (the class the pipeline types) of hidden 32, the transformer's
  `text_embed_dim`. It has 3 layers because the pipeline reads `hidden_states[-3]` (`hidden_state_skip_layer=2`);
  with 3 that is the first layer's output rather than the embeddings. Its Qwen2Tokenizer is byte-level BPE over a
  small word list in which each word of the pipeline's system prompt is one token, so the template's prefix is 34
  tokens as with Qwen's own vocabulary: the pipeline cuts a fixed `prompt_template_encode_start_idx = 34` tokens.
- text_encoder_2: a ByT5-shaped T5EncoderModel (384 byte-level ids, d_model 32) with transformers' ByT5Tokenizer,
  which needs no vocabulary file. The fixture's config has `text_embed_2_dim` null (kohya's stand-in DiT has no
  ByT5 input); HunyuanImage 2.1 has it (1472, ByT5-small's width) so quoted text in a prompt reaches the DiT, and so
  here it is ByT5's d_model. kohya puts no LoRA on that projection (`context_embedder_2`), so the file still applies.
- vae: AutoencoderKLHunyuanImage with 64 latent channels (the DiT's in_channels, as in 2.1) and scaling 0.75289 (2.1's),
  but a spatial compression of 8 instead of 2.1's 32, so 64 px images have 8 x 8 latents (64 patches) rather than 2 x 2.
- scheduler and guiders: FlowMatchEulerDiscreteScheduler with shift 5.0, and AdaptiveProjectedMixGuidance at CFG 3.5
  with APG from step 5 (guider) and from step 38 (ocr_guider, used when the prompt has quoted text): kohya's sampler
  for HunyuanImage 2.1 uses these values (flow_shift 5.0, scale 3.5, apg_start_step_general 5, apg_start_step_ocr 38).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "kohya-families" / "hunyuan_image"
TEXT_WIDTH = 32  # Qwen2.5-VL hidden size = the fixture's text_embed_dim
BYT5_WIDTH = 32  # ByT5 d_model = text_embed_2_dim
VAE_SCALE = 8
_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen's pad/eos and chat marks
_TEMPLATE_WORDS = ("system user Describe the image by detailing color shape size texture quantity text spatial "
                   "relationships of objects and background").split()
_WORDS = ("a an the of on in with and to or photo picture person woman man wearing red blue green black white dress "
          "shirt coat hat studio plain light dark street portrait fashion sign says hello world cat dog").split()


def _info() -> dict[str, Any]:
    return json.loads((FIXTURE / "model.json").read_text())


def transformer_config() -> dict[str, Any]:
    config = _info()["diffusers_equivalent"]["config"]
    assert config["text_embed_dim"] == TEXT_WIDTH, config
    return {**config, "text_embed_2_dim": BYT5_WIDTH}


def _qwen_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges learnt from the word lists (each with and without a leading space), so
    every listed word is one token; any other text falls back to byte tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=list(_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    words = (*_TEMPLATE_WORDS, *_WORDS)
    tok.train_from_iterator([w for word in words for w in (word, f" {word}")], trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def build_qwen_tokenizer(dir: Path) -> Path:
    """Write a small Qwen2Tokenizer folder to `dir` and return it."""
    from transformers import Qwen2Tokenizer

    vocab, merges = _qwen_vocab()
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, additional_special_tokens=list(_SPECIAL[1:]))
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(dir))
    return dir


def make_models(vocab_size: int, eos_token_id: int) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKLHunyuanImage, HunyuanImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

    # head_dim 16: the multimodal rope sections (t, h, w) split its 8 frequencies
    text = {"hidden_size": TEXT_WIDTH, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": eos_token_id,
            "rope_scaling": {"rope_type": "default", "mrope_section": [2, 2, 4]}}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": TEXT_WIDTH}
    qwen = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=None, eos_token_id=eos_token_id)
    byt5 = T5Config(vocab_size=384, d_model=BYT5_WIDTH, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                    tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    # the encoder's last level must hold 2 x 64 latent channels, the decoder's first a multiple of 64
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=64,
                                    block_out_channels=(32, 32, 64, 128), layers_per_block=1,
                                    spatial_compression_ratio=VAE_SCALE, sample_size=64, scaling_factor=0.75289)
    return {
        "transformer": HunyuanImageTransformer2DModel(**transformer_config()),
        "vae": vae,
        "text_encoder": Qwen2_5_VLForConditionalGeneration(qwen),
        "text_encoder_2": T5EncoderModel(byt5),
    }


def build_tiny_hunyuan(dir: Path, seed: int = 0) -> Path:
    """Write a tiny HunyuanImage 2.1 diffusers folder to `dir` and return it; HunyuanImagePipeline.from_pretrained
    loads it. Pass height and width: the pipeline's default is its fixed 64 latent px times the VAE's scale (512)."""
    from diffusers import AdaptiveProjectedMixGuidance, FlowMatchEulerDiscreteScheduler, HunyuanImagePipeline
    from transformers import ByT5Tokenizer, Qwen2Tokenizer

    dir = Path(dir)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(build_qwen_tokenizer(dir / "tokenizer")))
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        models = make_models(len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>"))
    pipe = HunyuanImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), tokenizer=tokenizer, tokenizer_2=ByT5Tokenizer(),
        guider=AdaptiveProjectedMixGuidance(guidance_scale=3.5, adaptive_projected_guidance_start_step=5),
        ocr_guider=AdaptiveProjectedMixGuidance(guidance_scale=3.5, adaptive_projected_guidance_start_step=38),
        **models)
    pipe.save_pretrained(str(dir), safe_serialization=True)
    return dir
