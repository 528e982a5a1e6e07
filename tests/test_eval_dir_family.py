"""eval-dir without [kohya]: the model family comes from the base model folder, else from the LoRA files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_monitor.config import parse_config
from lora_monitor.families import family_of_model_folder
from lora_monitor.run_spec import eval_dir_spec

FLUX_KEY = "lora_unet_double_blocks_0_img_attn_qkv"
SD_KEY = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _lora(folder: Path, name: str, key: str, metadata: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"{key}.lora_down.weight": torch.zeros(2, 4), f"{key}.lora_up.weight": torch.zeros(4, 2)}
    save_file(state, str(folder / name), metadata=metadata)


@pytest.mark.parametrize(("class_name", "files", "family"), [
    # the base model folder's pipeline class decides ...
    ("FluxPipeline", [], "flux"),
    ("FluxPipeline", [(SD_KEY, {"ss_base_model_version": "sd_v1"})], "flux"),  # the base model is what loads
    ("StableDiffusionXLPipeline", [], "sdxl"),
    ("StableDiffusionPipeline", [(FLUX_KEY, {"ss_base_model_version": "flux1"})], "sd"),  # rows name both
    # ... else the files: kohya's ss_base_model_version, else the key layout
    (None, [(SD_KEY, {"ss_base_model_version": "flux1"})], "flux"),
    (None, [(FLUX_KEY, {})], "flux"),
    (None, [(SD_KEY, {"ss_base_model_version": "sdxl_base_v1-0"})], "sdxl"),
    (None, [(SD_KEY, {})], "sd"),  # diffusers-named UNet modules fit SD and SDXL: the default
    (None, [], "sd"),
    ("StableDiffusion3Pipeline", [], "sd3"),
    (None, [("lora_unet_joint_blocks_0_x_block_attn_qkv", {"ss_base_model_version": "5-large"})], "sd3"),
    (None, [("lora_unet_joint_blocks_0_x_block_attn_qkv", {})], "sd3"),
    ("Lumina2Pipeline", [], "lumina"),
    (None, [("lora_unet_layers_0_attention_qkv", {"ss_base_model_version": "lumina2"})], "lumina"),
    ("HunyuanImagePipeline", [], "hunyuan_image"),
    (None, [("lora_unet_double_blocks_0_img_mlp_fc1", {"ss_base_model_version": "hunyuan-image-2.1"})],
     "hunyuan_image"),
    (None, [("lora_unet_blocks_0_self_attn_q_proj", {"ss_base_model_version": "anima"})], "anima"),
    # a family lora-monitor cannot evaluate: SD, whose rows then name both families
    (None, [("lora_unet_blocks_0_x", {"ss_base_model_version": "flux2"})], "sd"),
])
def test_family_without_kohya_section(tmp_path: Path, class_name: str | None, files: list, family: str) -> None:
    base = tmp_path / "base"
    base.mkdir()
    if class_name:
        (base / "model_index.json").write_text(json.dumps({"_class_name": class_name}), encoding="utf-8")
    for i, (key, metadata) in enumerate(files):
        _lora(tmp_path / "run", f"lora-step{i:08d}.safetensors", key, metadata)
    config = parse_config(f'[eval]\nbase_model = "{base.as_posix()}"\n', tmp_path / "c.toml")
    spec = eval_dir_spec(config, tmp_path / "run")
    assert (spec.family, spec.sdxl) == (family, family == "sdxl")


def test_kohya_section_still_decides(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}), encoding="utf-8")
    (tmp_path / "sd-scripts").mkdir()
    text = (f'[kohya]\nsd_scripts = "{(tmp_path / "sd-scripts").as_posix()}"\nsdxl = true\n'
            f'[eval]\nbase_model = "{base.as_posix()}"\n')
    assert eval_dir_spec(parse_config(text, tmp_path / "c.toml"), tmp_path / "run").family == "sdxl"


@pytest.mark.parametrize(("content", "family"), [
    ('{"_class_name": "FluxPipeline"}', "flux"),
    ('{"_class_name": "StableDiffusionPipeline"}', "sd"),
    ('{"_class_name": "StableDiffusionXLPipeline"}', "sdxl"),
    ("{}", None),
    ("not json", None),
    ('["FluxPipeline"]', None),
    (None, None),  # no model_index.json: a hub id or a single file
])
def test_family_of_model_folder(tmp_path: Path, content: str | None, family: str | None) -> None:
    if content is not None:
        (tmp_path / "model_index.json").write_text(content, encoding="utf-8")
    assert family_of_model_folder(tmp_path) == family
