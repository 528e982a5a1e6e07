"""SDXL end to end: `[kohya] sdxl = true` launches sdxl_train_network.py and evaluates with the SDXL pipeline.

The base is the tiny SDXL model; a stand-in `sdxl_train_network.py` prints kohya's progress (tqdm bar with
`avr_loss`, `epoch 1/1`, `saving checkpoint:`) and writes kohya-format SDXL LoRA files (`lora_unet_` with
kohya's SDXL block names, `lora_te1_`, `lora_te2_`) for that model, in place, under kohya's save names.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from PIL import Image
from safetensors import safe_open

from tests.conftest import cli, write_config

MAX_STEPS = 3
SAVE_EVERY = 2
LOSSES = [0.5, 0.3, 0.1]  # per step; kohya shows their running mean: 0.5, 0.4, 0.3
METRICS = ["visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score"]
PROMPTS = (
    "a photo of a red dress, sks style --d 1\n"
    "a red dress on a white background, sks style --d 2\n"
)
# checkpoint -> (step, epoch, total_loss): the step file at step 2, the final file at step 3
EXPECTED_ROWS = {
    "testlora-step00000002.safetensors": (2, 1, 0.4),
    "testlora.safetensors": (3, 1, 0.3),
}

# kohya's SDXL training script, reduced to what the monitor sees. Its LoRA modules are those of the base
# model it is given: every Linear of the UNet's transformer blocks and of both CLIP text encoders.
STAND_IN = r'''
import argparse, json, logging, re, sys, time
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save
from tqdm import tqdm

p = argparse.ArgumentParser()
for name in ("pretrained_model_name_or_path", "output_dir", "output_name"):
    p.add_argument("--" + name)
p.add_argument("--max_train_steps", type=int)
p.add_argument("--save_every_n_steps", type=int)
args, _ = p.parse_known_args()
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-8s %(message)s", stream=sys.stderr)
log = logging.getLogger("sdxl_train_network")
base, out_dir = Path(args.pretrained_model_name_or_path), Path(args.output_dir)
RANK = 4
# diffusers attention blocks of the tiny SDXL UNet -> kohya's SDXL (sgm) names
SGM = {"down_blocks.1.attentions.0": "input_blocks_3_1", "mid_block.attentions.0": "middle_block_1",
       "up_blocks.0.attentions.0": "output_blocks_0_1", "up_blocks.0.attentions.1": "output_blocks_1_1"}
TE = re.compile(r"(?:text_model\.)?(encoder\.layers\.\d+\.(?:self_attn\.[qkvo]\w*_proj|mlp\.fc[12]))\.weight")


def linears(path):
    with safe_open(str(path), framework="numpy") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys() if len(f.get_slice(k).get_shape()) == 2}


def modules():
    found = {}
    for key, shape in linears(base / "unet" / "diffusion_pytorch_model.safetensors").items():
        for block, sgm in SGM.items():
            if key.startswith(block + ".") and key.endswith(".weight"):
                inner = key[len(block) + 1:-len(".weight")].replace(".", "_")
                found[f"lora_unet_{sgm}_{inner}"] = shape
    for prefix, folder in (("lora_te1", "text_encoder"), ("lora_te2", "text_encoder_2")):
        for key, shape in linears(base / folder / "model.safetensors").items():
            if m := TE.fullmatch(key):
                found[f"{prefix}_text_model_{m.group(1).replace('.', '_')}"] = shape
    return found


MODULES = modules()


def lora_bytes(step, epoch):
    rng = np.random.default_rng(step)
    tensors = {}
    for name, (out_dim, in_dim) in MODULES.items():
        tensors[name + ".lora_down.weight"] = (rng.standard_normal((RANK, in_dim)) * 0.2).astype(np.float32)
        tensors[name + ".lora_up.weight"] = (rng.standard_normal((out_dim, RANK)) * 0.2).astype(np.float32)
        tensors[name + ".alpha"] = np.array(RANK, dtype=np.float32)
    meta = {"ss_steps": str(step), "ss_epoch": str(epoch), "ss_output_name": args.output_name,
            "ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": str(RANK),
            "ss_base_model_version": "sdxl_base_v1-0"}
    return save(tensors, metadata=meta)


def save_model(name, step, epoch):
    path = out_dir / f"{name}.safetensors"
    print(f"\nsaving checkpoint: {path}", flush=True)  # printed before the file is written
    data = lora_bytes(step, epoch)
    with open(path, "wb") as f:  # in place, several writes, like kohya
        for i in range(4):
            f.write(data[i * len(data) // 4:(i + 1) * len(data) // 4])
            f.flush()
            time.sleep(0.1)


losses = json.loads("__LOSSES__")  # the loss of each step
print("running training / 学習開始")
print(f"  total optimization steps / 学習ステップ数: {args.max_train_steps}")
bar = tqdm(range(args.max_train_steps), smoothing=0, desc="steps", mininterval=0)
print("\nepoch 1/1\n", flush=True)
for step in range(1, args.max_train_steps + 1):
    time.sleep(0.3)
    bar.update(1)
    if step % args.save_every_n_steps == 0 and step < args.max_train_steps:
        save_model(f"{args.output_name}-step{step:08d}", step, 0)  # ss_epoch: 0-based in step files
    bar.set_postfix(avr_loss=sum(losses[:step]) / step)
save_model(args.output_name, args.max_train_steps, 1)  # the final file: 1-based
log.info("model saved.")
bar.close()
'''


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.sdxl_model import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


def sdxl_config(workdir: Path, demo_assets: Any, base: Path) -> tuple[Path, Path]:
    """The demo config with the tiny SDXL base, `sdxl = true` and the stand-in's folder as sd_scripts."""
    sd_scripts = workdir / "sd-scripts"
    sd_scripts.mkdir(parents=True)
    script = STAND_IN.replace("__LOSSES__", json.dumps(LOSSES))
    (sd_scripts / "sdxl_train_network.py").write_text(script, encoding="utf-8")  # and no train_network.py
    prompts = workdir / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    kohya = {"pretrained_model_name_or_path": str(base), "output_name": "testlora", "max_train_steps": MAX_STEPS,
             "save_every_n_steps": SAVE_EVERY}
    config = write_config(workdir, demo_assets, kohya=kohya,
                          eval_={"steps": 2, "width": 64, "height": 64, "prompts": str(prompts), "batch_size": 2,
                                 "holdout": False})
    text = config.read_text(encoding="utf-8")
    line = f"sd_scripts = {json.dumps(str(demo_assets.sd_scripts))}"
    assert line in text
    config.write_text(text.replace(line, f"sd_scripts = {json.dumps(str(sd_scripts))}\nsdxl = true"),
                      encoding="utf-8")
    return config, sd_scripts


def test_sdxl_run_is_trained_by_the_sdxl_script_and_evaluated_with_the_sdxl_pipeline(
        tmp_path: Path, demo_assets: Any, tiny_sdxl: Path) -> None:
    config, _ = sdxl_config(tmp_path, demo_assets, tiny_sdxl)
    started = time.monotonic()
    result = cli("train", "--config", str(config), cwd=tmp_path, timeout=240)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    out = tmp_path / "output"
    for name in EXPECTED_ROWS:  # the stand-in wrote kohya SDXL LoRAs: all three key prefixes
        with safe_open(str(out / name), framework="numpy") as f:
            assert {k.split("_")[0] + "_" + k.split("_")[1] for k in f.keys()} == {
                "lora_unet", "lora_te1", "lora_te2"}
            assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k") for k in f.keys())
    rows = pd.read_csv(out / "loss_tracker.csv")
    assert rows["status"].iloc[0] == "baseline"  # the SDXL base model without a LoRA, first
    rows = rows.iloc[1:]
    assert rows["checkpoint"].is_unique
    rows = rows.set_index("checkpoint")
    assert sorted(rows.index) == sorted(EXPECTED_ROWS), output[-4000:]
    for name, (step, epoch, loss) in EXPECTED_ROWS.items():
        row = rows.loc[name]
        # ok: an SD 1.x pipeline could neither run this UNet (text_time conditioning) nor load lora_te2_
        assert row["status"] == "ok", (name, row.get("note"))
        assert (int(row["step"]), int(row["epoch"]), float(row["total_loss"])) == (step, epoch, loss), name
        assert pd.isna(row["learning_rate"])  # this trainer logs no TensorBoard scalars: nothing invented
        for column in METRICS:
            assert math.isfinite(float(row[column])), (name, column)
        images = sorted((out / "eval" / Path(name).stem).glob("[0-9][0-9].png"))
        assert len(images) == 2 * PROMPTS.count("\n"), name  # two seeds a prompt (seeds_per_prompt = 2)
        for path in images:
            with Image.open(path) as image:
                assert image.size == (64, 64), path
    # different weights give different images
    first, final = (sorted((out / "eval" / Path(n).stem).glob("*.png"))[0].read_bytes() for n in EXPECTED_ROWS)
    assert first != final
    print(f"SDXL run: {elapsed:.1f} s", flush=True)
