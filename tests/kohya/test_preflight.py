"""kohya/preflight.py: what is caught before kohya starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from lora_monitor.config import KohyaConfig
from lora_monitor.errors import UserError
from lora_monitor.kohya.preflight import preflight

# -- preflight -----------------------------------------------------------------------------------------------


def good_setup(tmp_path: Path, **args: Any) -> KohyaConfig:
    sd = tmp_path / "sd-scripts"
    sd.mkdir(exist_ok=True)
    (sd / "train_network.py").write_text("")
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    base = {"output_dir": str(tmp_path / "out"), "pretrained_model_name_or_path": str(model),
            "save_every_n_steps": 10}
    return KohyaConfig(sd_scripts=sd, args={k: v for k, v in {**base, **args}.items() if v is not None})


def test_preflight_passes_and_creates_the_output_dir(tmp_path: Path) -> None:
    assert preflight(good_setup(tmp_path)) == []
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("no_sd_scripts", "kohya.sd_scripts"),
        ("no_script", "missing.py not found"),
        ("sdxl_script_missing", "sdxl_train_network.py not found"),
        ("missing_python", "kohya.python"),
        ("output_is_file", "is a file"),
        ("output_under_file", "cannot be created"),
        ("no_output", "output_dir is not set"),
        ("model_missing_abs", "pretrained_model_name_or_path .*not found"),
        ("model_missing_file_name", "pretrained_model_name_or_path .*not found"),
        ("model_missing_bare", "pretrained_model_name_or_path .*not found"),
        ("model_missing_tilde", "pretrained_model_name_or_path .*not found"),
        ("no_model", "pretrained_model_name_or_path is not set"),
        ("ckpt", "save_model_as = 'ckpt'"),
        ("dataset_config_missing", "dataset_config .* not found"),
    ],
)
def test_preflight_errors(tmp_path: Path, change: str, message: str) -> None:
    kohya = good_setup(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    changes: dict[str, KohyaConfig] = {
        "no_sd_scripts": KohyaConfig(sd_scripts=tmp_path / "nope", args=kohya.args),
        "no_script": KohyaConfig(sd_scripts=kohya.sd_scripts, script="missing.py", args=kohya.args),
        "sdxl_script_missing": KohyaConfig(sd_scripts=kohya.sd_scripts, sdxl=True, args=kohya.args),
        "missing_python": KohyaConfig(sd_scripts=kohya.sd_scripts, python=str(tmp_path / "py"),
                                      args=kohya.args),
        "output_is_file": good_setup(tmp_path, output_dir=str(blocker)),
        "output_under_file": good_setup(tmp_path, output_dir=str(blocker / "out")),
        "no_output": good_setup(tmp_path, output_dir=None),
        "model_missing_abs": good_setup(tmp_path, pretrained_model_name_or_path="/no/such/model"),
        "model_missing_file_name": good_setup(tmp_path,
                                              pretrained_model_name_or_path="models/sd15.safetensors"),
        "model_missing_bare": good_setup(tmp_path, pretrained_model_name_or_path="sd15"),
        "model_missing_tilde": good_setup(tmp_path, pretrained_model_name_or_path="~/models/sd15"),
        "no_model": good_setup(tmp_path, pretrained_model_name_or_path=None),
        "ckpt": good_setup(tmp_path, save_model_as="ckpt"),
        "dataset_config_missing": good_setup(tmp_path, dataset_config=str(tmp_path / "d.toml")),
    }
    with pytest.raises(UserError, match=message):
        preflight(changes[change])


@pytest.mark.parametrize("model", ["runwayml/stable-diffusion-v1-5", "stabilityai/sdxl-base_1.0"])
def test_preflight_does_not_check_hub_ids(tmp_path: Path, model: str) -> None:
    assert preflight(good_setup(tmp_path, pretrained_model_name_or_path=model)) == []


def test_preflight_accepts_a_relative_model_in_kohyas_folder(tmp_path: Path) -> None:
    kohya = good_setup(tmp_path, pretrained_model_name_or_path="models/sd15")
    (kohya.sd_scripts / "models" / "sd15").mkdir(parents=True)
    assert preflight(kohya) == []


@pytest.mark.parametrize(
    ("args", "count"),
    [
        ({"save_every_n_steps": None}, 1),
        ({"save_every_n_steps": None, "save_every_n_epochs": 1}, 0),
        ({}, 0),
    ],
)
def test_preflight_warns_without_save_cadence(tmp_path: Path, args: dict[str, Any], count: int) -> None:
    warnings = preflight(good_setup(tmp_path, **args))
    assert len(warnings) == count
    assert all("only the final LoRA" in w for w in warnings)


def test_preflight_reads_kohyas_config_file(tmp_path: Path) -> None:
    (tmp_path / "k.toml").write_text('[s]\nsave_model_as = "pt"\n', encoding="utf-8")
    with pytest.raises(UserError, match="save_model_as = 'pt'"):
        preflight(good_setup(tmp_path, config_file=str(tmp_path / "k.toml")))
    (tmp_path / "k.toml").write_text("[s]\ncache_latents = true\nsave_every_n_epochs = 2\n", encoding="utf-8")
    warnings = preflight(good_setup(tmp_path, config_file=str(tmp_path / "k.toml"), cache_latents=False))
    assert len(warnings) == 1 and "kohya.args.cache_latents = False cannot override True" in warnings[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_preflight_unwritable_output_dir(tmp_path: Path) -> None:
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o500)
    try:
        with pytest.raises(UserError, match="not writable"):
            preflight(good_setup(tmp_path, output_dir=str(out)))
    finally:
        out.chmod(0o700)
