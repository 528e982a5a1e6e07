"""The newer families end to end through the CLI, on each family's tiny diffusers pipeline and kohya's own LoRA file
(SD3, Lumina 2, HunyuanImage 2.1, Anima):

- `eval-dir` on a folder of the family's files (the fixture and a stronger copy), no [kohya] section: the family
  comes from the base model's (modular_)model_index.json, each file gets a row of real metrics, the stronger one scores
  differently;
- `train` with `[kohya] script` the family's kohya trainer (`sd3_train_network.py`, ...): a stand-in of that script
  (a real subprocess printing kohya's progress and saving the family's files in place) is launched, and each
  checkpoint it saves is evaluated with the family's pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests import anima_model, hunyuan_model, lumina_model, sd3_model
from tests.conftest import cli, write_config

BUILDERS = {"sd3": sd3_model.build_tiny_sd3, "lumina": lumina_model.build_tiny_lumina,
            "hunyuan_image": hunyuan_model.build_tiny_hunyuan, "anima": anima_model.build_tiny_anima}
FIXTURES = {"sd3": sd3_model.FIXTURE, "lumina": lumina_model.FIXTURE, "hunyuan_image": hunyuan_model.FIXTURE,
            "anima": anima_model.FIXTURE}

METRICS = ["visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score"]


def _copy(family: str, folder: Path, name: str, steps: int, up_factor: float) -> None:
    source = FIXTURES[family] / "tiny-step00000004.safetensors"
    with safe_open(str(source), framework="pt") as f:
        metadata = dict(f.metadata())
    state = {k: v * up_factor if ".lora_up." in k else v for k, v in load_file(str(source)).items()}
    save_file(state, str(folder / name), metadata={**metadata, "ss_steps": str(steps)})


@pytest.mark.parametrize("family", ["sd3", "lumina", "hunyuan_image", "anima"])
def test_eval_dir_scores_kohya_files_of_the_family(family: str, demo_assets: Any, tmp_path: Path) -> None:
    base = BUILDERS[family](tmp_path / "model")
    folder = tmp_path / "run"
    folder.mkdir()
    _copy(family, folder, "tiny-step00000004.safetensors", 4, 1.0)
    _copy(family, folder, "tiny-step00000008.safetensors", 8, 4.0)
    config = tmp_path / "config.toml"
    config.write_text(
        f'[eval]\nbase_model = "{base.as_posix()}"\nprompts = "{demo_assets.prompts.as_posix()}"\n'
        f'references = "{demo_assets.train_data_dir.as_posix()}"\nsteps = 2\nwidth = 64\nheight = 64\n'
        f'[metrics]\nfashion_clip_model = "{demo_assets.fashion_clip.as_posix()}"\n'
        f'visual_model = "{demo_assets.dino.as_posix()}"\n', encoding="utf-8")
    done = cli("eval-dir", str(folder), "--config", str(config), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = pd.read_csv(folder / "loss_tracker.csv")
    assert table["status"].iloc[0] == "baseline"  # the base model alone, scored the same way
    rows = table.iloc[1:].set_index("checkpoint")
    assert list(rows.index) == ["tiny-step00000004.safetensors", "tiny-step00000008.safetensors"]
    assert list(rows["status"]) == ["ok", "ok"], rows["note"].tolist()
    assert list(rows["step"]) == [4, 8]
    for metric in METRICS:
        assert all(math.isfinite(v) for v in rows[metric]), metric
    # the same prompts and seeds: a LoRA 4x as strong must change the images, so the scores differ
    assert rows.loc["tiny-step00000004.safetensors", "color_loss"] != rows.loc["tiny-step00000008.safetensors",
                                                                              "color_loss"]


# kohya's trainer of the family reduced to what the monitor sees: tqdm's bar with avr_loss, `epoch 1/1`, and at each
# save `saving checkpoint:` then the family's LoRA file (kohya's own fixture file, its up weights scaled by the step,
# so each checkpoint differs), written in place in several parts.
STAND_IN = r'''
import argparse, sys, time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

p = argparse.ArgumentParser()
for name in ("pretrained_model_name_or_path", "output_dir", "output_name"):
    p.add_argument("--" + name)
p.add_argument("--max_train_steps", type=int)
p.add_argument("--save_every_n_steps", type=int)
args, _ = p.parse_known_args()
out_dir = Path(args.output_dir)
FIXTURE = "__FIXTURE__"
with safe_open(FIXTURE, framework="pt") as f:
    TENSORS = {k: f.get_tensor(k) for k in f.keys()}
    META = dict(f.metadata())


def save_model(name, step, epoch):
    path = out_dir / f"{name}.safetensors"
    print(f"\nsaving checkpoint: {path}", flush=True)
    tensors = {k: v * step if ".lora_up." in k else v for k, v in TENSORS.items()}
    data = save(tensors, metadata={**META, "ss_steps": str(step), "ss_epoch": str(epoch),
                                   "ss_output_name": args.output_name})
    with open(path, "wb") as f:
        for i in range(4):
            f.write(data[i * len(data) // 4:(i + 1) * len(data) // 4])
            f.flush()
            time.sleep(0.05)


bar = tqdm(range(args.max_train_steps), smoothing=0, desc="steps", mininterval=0)
print("\nepoch 1/1\n", flush=True)
for step in range(1, args.max_train_steps + 1):
    time.sleep(0.2)
    bar.update(1)
    if step % args.save_every_n_steps == 0 and step < args.max_train_steps:
        save_model(f"{args.output_name}-step{step:08d}", step, 0)
    bar.set_postfix(avr_loss=1.0 / step)
save_model(args.output_name, args.max_train_steps, 1)
bar.close()
'''
SCRIPTS = {"sd3": "sd3_train_network.py", "lumina": "lumina_train_network.py",
           "hunyuan_image": "hunyuan_image_train_network.py", "anima": "anima_train_network.py"}


@pytest.mark.parametrize("family", ["sd3", "lumina", "hunyuan_image", "anima"])
def test_train_runs_the_familys_kohya_script_and_evaluates_its_files(family: str, demo_assets: Any,
                                                                     tmp_path: Path) -> None:
    base = BUILDERS[family](tmp_path / "model")
    sd_scripts = tmp_path / "sd-scripts"
    sd_scripts.mkdir()
    fixture = (FIXTURES[family] / "tiny-step00000004.safetensors").as_posix()
    (sd_scripts / SCRIPTS[family]).write_text(STAND_IN.replace("__FIXTURE__", fixture), encoding="utf-8")
    kohya = {"pretrained_model_name_or_path": str(base), "output_name": "tiny", "max_train_steps": 3,
             "save_every_n_steps": 2}
    config = write_config(tmp_path, demo_assets, kohya=kohya,
                          eval_={"steps": 2, "width": 64, "height": 64, "batch_size": 2, "holdout": False})
    text = config.read_text(encoding="utf-8")
    line = f"sd_scripts = {json.dumps(str(demo_assets.sd_scripts))}"
    assert line in text
    config.write_text(text.replace(line, f"sd_scripts = {json.dumps(str(sd_scripts))}\n"
                                         f"script = {json.dumps(SCRIPTS[family])}"), encoding="utf-8")
    result = cli("train", "--config", str(config), cwd=tmp_path, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    table = pd.read_csv(tmp_path / "output" / "loss_tracker.csv")
    assert table["status"].iloc[0] == "baseline"
    rows = table.iloc[1:].set_index("checkpoint")
    assert sorted(rows.index) == ["tiny-step00000002.safetensors", "tiny.safetensors"]
    assert list(rows["status"]) == ["ok", "ok"], rows["note"].tolist()
    assert sorted(rows["step"]) == [2, 3]
    for metric in METRICS:
        assert all(math.isfinite(v) for v in rows[metric]), metric
