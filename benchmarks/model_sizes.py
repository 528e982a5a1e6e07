"""Parameter counts and weight sizes of the full-size models of each evaluated transformer family (SD3.x, Lumina 2,
HunyuanImage 2.1, Anima), counted exactly on PyTorch's meta device from the published configs as diffusers and
transformers write them (no weights are allocated or downloaded).

This is what the README's memory tables are computed from: weights only, activations not included. Run:
    python benchmarks/model_sizes.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

GIB = 1024**3
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "d_kv": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu"}
SD3_COMMON = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "attention_head_dim": 64,
              "joint_attention_dim": 4096, "pooled_projection_dim": 2048}
SD3_TRANSFORMERS = {  # the diffusers transformer/config.json of each model
    "SD3-medium": {**SD3_COMMON, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                   "pos_embed_max_size": 192},
    "SD3.5-medium": {**SD3_COMMON, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                     "pos_embed_max_size": 384, "qk_norm": "rms_norm", "dual_attention_layers": tuple(range(13))},
    "SD3.5-large": {**SD3_COMMON, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
                    "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
}
VAE16 = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
         "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
         "up_block_types": ("UpDecoderBlock2D",) * 4, "use_quant_conv": False, "use_post_quant_conv": False}


QWEN25_VL_7B = {"text_config": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                                 "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
                "vision_config": {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "depth": 32,
                                  "out_hidden_size": 3584}}
GEMMA2_2B = {"hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 256000}
QWEN3_06B = {"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936}
BYT5_SMALL = {"d_model": 1472, "d_ff": 3584, "num_layers": 12, "num_heads": 6, "d_kv": 64, "vocab_size": 384,
              "feed_forward_proj": "gated-gelu"}
ANIMA_DIT = {"num_attention_heads": 16, "attention_head_dim": 128, "num_layers": 28, "text_embed_dim": 1024,
             "adaln_lora_dim": 256, "extra_pos_embed_type": None}  # kohya's anima_utils: 2048 wide, 28 blocks


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sizes() -> dict[str, int]:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        out = {name: count(SD3Transformer2DModel(**config)) for name, config in SD3_TRANSFORMERS.items()}
        out["CLIP-L"] = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
        out["CLIP-G"] = count(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
        out["T5-XXL"] = count(T5EncoderModel(T5Config(**T5_XXL)))
        out["VAE (16 ch)"] = count(AutoencoderKL(**VAE16))
        out.update(newer_families())
    return out


def newer_families() -> dict[str, int]:
    """Lumina 2, HunyuanImage 2.1 and Anima: transformer and text encoders (call on the meta device)."""
    from diffusers import CosmosTransformer3DModel, HunyuanImageTransformer2DModel, Lumina2Transformer2DModel
    from diffusers.models.condition_embedders.condition_embedder_anima import AnimaTextConditioner
    from transformers import (
        Gemma2Config,
        Gemma2Model,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen3Config,
        Qwen3Model,
        T5Config,
        T5EncoderModel,
    )

    return {
        "Lumina 2 DiT": count(Lumina2Transformer2DModel(cap_feat_dim=2304)),  # diffusers' defaults: Lumina-Image-2.0
        "Gemma2-2B": count(Gemma2Model(Gemma2Config(**GEMMA2_2B))),
        "HunyuanImage 2.1 DiT": count(HunyuanImageTransformer2DModel(text_embed_2_dim=1472)),
        "Qwen2.5-VL-7B": count(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B))),
        "ByT5-small encoder": count(T5EncoderModel(T5Config(**BYT5_SMALL))),
        "Anima DiT": count(CosmosTransformer3DModel(**ANIMA_DIT)),
        "Anima LLM adapter": count(AnimaTextConditioner()),
        "Qwen3-0.6B": count(Qwen3Model(Qwen3Config(**QWEN3_06B))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    counts = sizes()
    print(f"{'model':<22} {'parameters':>14} {'bf16 GiB':>9}")
    for name, n in counts.items():
        print(f"{name:<22} {n:>14,} {n * 2 / GIB:>9.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(counts, f, indent=1)


if __name__ == "__main__":
    main()
