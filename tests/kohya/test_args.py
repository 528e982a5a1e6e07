"""kohya/args.py: the arguments kohya trains with and the argv that starts it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from lora_monitor.config import KohyaConfig
from lora_monitor.errors import UserError
from lora_monitor.kohya import args as kohya_args
from lora_monitor.kohya.args import build_argv, effective_args, train_data_dirs

# -- build_argv --------------------------------------------------------------------------------

SD = Path("/opt/sd-scripts")


@pytest.mark.parametrize(
    ("kohya", "expected"),
    [
        (KohyaConfig(sd_scripts=SD, python="/py"), ["/py", "-u", "/opt/sd-scripts/train_network.py"]),
        (KohyaConfig(sd_scripts=SD, python="/py", sdxl=True),
         ["/py", "-u", "/opt/sd-scripts/sdxl_train_network.py"]),
        (KohyaConfig(sd_scripts=SD, python="/py", script="flux_train_network.py"),
         ["/py", "-u", "/opt/sd-scripts/flux_train_network.py"]),
        (KohyaConfig(sd_scripts=SD, python="/py", script="/elsewhere/t.py"),
         ["/py", "-u", "/elsewhere/t.py"]),
        (KohyaConfig(sd_scripts=SD, python="/py", args={
            "max_train_steps": 200, "learning_rate": 3e-4, "unet_lr": 1e-05, "cache_latents": True,
            "flip_aug": False, "resolution": "512,512", "network_args": ["conv_dim=4", "conv_alpha=1"],
            "optimizer_args": [], "seed": 0,
         }),
         ["/py", "-u", "/opt/sd-scripts/train_network.py", "--max_train_steps", "200",
          "--learning_rate", "0.0003", "--unet_lr", "1e-05", "--cache_latents", "--resolution", "512,512",
          "--network_args", "conv_dim=4", "conv_alpha=1", "--seed", "0"]),
        (KohyaConfig(sd_scripts=SD, python="/py", args={"output_dir": "/o/with space", "x": "-1"}),
         ["/py", "-u", "/opt/sd-scripts/train_network.py", "--output_dir", "/o/with space", "--x", "-1"]),
    ],
)
def test_build_argv(kohya: KohyaConfig, expected: list[str]) -> None:
    assert build_argv(kohya) == expected


def test_build_argv_defaults_to_this_python() -> None:
    assert build_argv(KohyaConfig(sd_scripts=SD))[:2] == [sys.executable, "-u"]


def test_build_argv_accelerate_uses_the_venvs_accelerate(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "accelerate").write_text("#!/bin/sh\n")
    (bin_dir / "accelerate").chmod(0o755)
    kohya = KohyaConfig(sd_scripts=SD, python=str(bin_dir / "python"), launcher="accelerate",
                        accelerate={"num_processes": 1, "mixed_precision": "bf16",
                                    "num_cpu_threads_per_process": 1},
                        args={"seed": 1})
    assert build_argv(kohya) == [
        str(bin_dir / "accelerate"), "launch", "--num_processes", "1", "--mixed_precision", "bf16",
        "--num_cpu_threads_per_process", "1", "/opt/sd-scripts/train_network.py", "--seed", "1",
    ]
    (bin_dir / "accelerate").unlink()
    monkeypatch.setattr(kohya_args.shutil, "which", lambda name: None)
    assert build_argv(kohya)[:4] == [str(bin_dir / "python"), "-m", "accelerate.commands.accelerate_cli",
                                     "launch"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"network_args": {"a": 1}}, r"kohya.args.network_args = \{'a': 1\}"),
        ({"network_args": [True]}, "kohya.args.network_args = True"),
        ({"--seed": 1}, "not an option name"),
        ({"a b": 1}, "not an option name"),
    ],
)
def test_build_argv_rejects_what_argparse_cannot_take(args: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_argv(KohyaConfig(sd_scripts=SD, python="/py", args=args))


def test_build_argv_rejects_unknown_launcher() -> None:
    with pytest.raises(UserError, match="kohya.launcher"):
        build_argv(KohyaConfig(sd_scripts=SD, launcher="torchrun"))


# -- effective_args and train_data_dirs ------------------------------------------------------------

KOHYA_TOML = """
top_level = "kept"
[model_arguments]
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
[saving_arguments]
save_every_n_epochs = 1
save_model_as = "safetensors"
[training_arguments]
learning_rate = 1e-4
cache_latents = true
max_train_steps = 100
"""


@pytest.mark.parametrize(
    ("cli", "expected"),
    [
        ({}, {"pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5", "save_every_n_epochs": 1,
              "save_model_as": "safetensors", "learning_rate": 1e-4, "cache_latents": True,
              "max_train_steps": 100, "top_level": "kept"}),
        ({"max_train_steps": 7, "learning_rate": 2e-4}, {"max_train_steps": 7, "learning_rate": 2e-4}),
        ({"cache_latents": False}, {"cache_latents": True}),  # false is never passed, so the file wins
        ({"flip_aug": False}, {"flip_aug": False}),
    ],
)
def test_effective_args_merges_kohyas_config_file(tmp_path: Path, cli: dict[str, Any],
                                                  expected: dict[str, Any]) -> None:
    (tmp_path / "kohya.toml").write_text(KOHYA_TOML, encoding="utf-8")
    kohya = KohyaConfig(sd_scripts=tmp_path, args={"config_file": str(tmp_path / "kohya"), **cli})
    merged = effective_args(kohya)
    assert {key: merged[key] for key in expected} == expected
    assert merged["config_file"] == str(tmp_path / "kohya")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "not found"), ("a = [", "not valid TOML")],
)
def test_effective_args_bad_config_file(tmp_path: Path, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / "k.toml").write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message):
        effective_args(KohyaConfig(sd_scripts=tmp_path, args={"config_file": str(tmp_path / "k.toml")}))


def test_train_data_dirs_from_dataset_config(tmp_path: Path) -> None:
    (tmp_path / "datasets.toml").write_text(
        """
[general]
caption_extension = ".txt"
[[datasets]]
resolution = 512
  [[datasets.subsets]]
  image_dir = "images/dress"
  [[datasets.subsets]]
  image_dir = "/abs/reg"
  is_reg = true
[[datasets]]
  [[datasets.subsets]]
  image_dir = "/abs/more"
  [[datasets.subsets]]
  image_dir = "images/dress"
""", encoding="utf-8")
    kohya = KohyaConfig(sd_scripts=tmp_path, args={"dataset_config": str(tmp_path / "datasets.toml"),
                                                   "train_data_dir": "/ignored"})
    assert train_data_dirs(kohya) == [tmp_path / "images" / "dress", Path("/abs/more")]


def test_train_data_dirs_from_json_dataset_config(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps({"datasets": [{"subsets": [{"image_dir": "/a"}]}]}))
    kohya = KohyaConfig(sd_scripts=tmp_path, args={"dataset_config": str(tmp_path / "d.json")})
    assert train_data_dirs(kohya) == [Path("/a")]


def test_train_data_dirs_dreambooth_folders(tmp_path: Path) -> None:
    train = tmp_path / "train"
    for name in ("10_garment", "1_red dress", "0_skipped", "norepeats", "x_1"):
        (train / name).mkdir(parents=True)
    (train / "5_file.txt").write_text("")
    kohya = KohyaConfig(sd_scripts=tmp_path, args={"train_data_dir": str(train)})
    assert train_data_dirs(kohya) == [train / "10_garment", train / "1_red dress"]
    kohya = KohyaConfig(sd_scripts=tmp_path, args={"train_data_dir": str(train), "in_json": "/m.json"})
    assert train_data_dirs(kohya) == [train]
