"""Tiny, randomly initialised stand-ins for the scoring models, built locally (no hub, no network).

`build_tiny_fashion_clip` writes an open_clip folder in the layout of hub models such as
Marqo/marqo-fashionCLIP (`open_clip_config.json` + `open_clip_model.safetensors`), loadable with
`open_clip.create_model_and_transforms("local-dir:DIR")`. Its text_cfg names no HF tokenizer, so open_clip
uses its bundled original CLIP BPE tokenizer: prompts are tokenized exactly as for the real model.

`build_tiny_dino` writes a transformers ViT folder (`config.json`, `model.safetensors`,
`preprocessor_config.json`) loadable with `ViTModel.from_pretrained(DIR)` like facebook/dino-vits16.

Both are deterministic for a given seed and reused when the folder was already built with the same recipe.
Their embeddings carry no meaning; they exist so the whole scoring path runs in tests and offline demos.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_monitor.demo.build_cache import build_once

_RECIPE_VERSION = 1
# ImageNet statistics as used by DINO; the OpenAI ones as used by CLIP models.
_IMAGENET_MEAN = [0.485, 0.456, 0.406]
_IMAGENET_STD = [0.229, 0.224, 0.225]
_OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]

TINY_CLIP_CONFIG: dict = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    },
    "preprocess_cfg": {
        "size": 64,
        "mean": _OPENAI_MEAN,
        "std": _OPENAI_STD,
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def build_tiny_fashion_clip(directory: Path, seed: int = 0) -> Path:
    """Build (or reuse) a tiny open_clip CLIP in `directory`; returns the folder path (~7 MB)."""
    recipe = {"kind": "open_clip", "seed": seed, "version": _RECIPE_VERSION, "config": TINY_CLIP_CONFIG}
    return build_once(Path(directory), recipe, lambda tmp: _write_tiny_clip(tmp, seed))


def build_tiny_dino(directory: Path, seed: int = 0) -> Path:
    """Build (or reuse) a tiny ViT (DINO-shaped, CLS token output) in `directory`; returns the folder path."""
    recipe = {"kind": "vit", "seed": seed, "version": _RECIPE_VERSION}
    return build_once(Path(directory), recipe, lambda tmp: _write_tiny_dino(tmp, seed))


def _write_tiny_clip(directory: Path, seed: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG["model_cfg"])
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    (directory / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG, indent=1), encoding="utf-8")


def _write_tiny_dino(directory: Path, seed: int) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        # A wider init than ViT's 0.02 so random CLS features still depend visibly on the image.
        initializer_range=0.2,
    )
    model = ViTModel(config, add_pooling_layer=False)
    model.save_pretrained(directory, safe_serialization=True)
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": 32, "width": 32},
        image_mean=_IMAGENET_MEAN,
        image_std=_IMAGENET_STD,
    )
    processor.save_pretrained(directory)
