"""Shared test assets: the demo's tiny models and data, built once per test session, and small configs."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A short training run for the fault tests: 40 steps, a checkpoint every 10 (about 10 s of training).
SHORT_RUN = {"max_train_steps": 40, "save_every_n_steps": 10}
FAST_EVAL = {"steps": 4}


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from lora_monitor.demo.build import build_demo

    return build_demo(tmp_path_factory.mktemp("demo-assets"))


def write_config(workdir: Path, assets: Any, kohya: dict | None = None, eval_: dict | None = None,
                 extra: str = "") -> Path:
    """A demo-style config in `workdir` (output in workdir/output) with overrides."""
    from lora_monitor.demo.run import demo_config_text

    paths = dataclasses.replace(assets, kohya_args={**assets.kohya_args, **SHORT_RUN, **(kohya or {})},
                                eval_settings={**assets.eval_settings, **FAST_EVAL, **(eval_ or {})})
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.toml"
    config.write_text(demo_config_text(paths, workdir) + extra, encoding="utf-8")
    return config


def cli(*args: str, cwd: Path, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lora_monitor.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


def start_cli(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lora_monitor.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def run_demo_trainer(folder: Path, assets: Any, output_name: str, **args: Any) -> Path:
    """Run the bundled kohya-style trainer alone (no monitor) into `folder`; kohya args override the demo's."""
    trainer = Path(__file__).resolve().parent.parent / "lora_monitor" / "demo" / "sd_scripts" / "train_network.py"
    argv = [sys.executable, str(trainer), "--pretrained_model_name_or_path", str(assets.base_model),
            "--train_data_dir", str(assets.train_data_dir), "--output_dir", str(folder), "--output_name", output_name]
    for key, value in {**assets.kohya_args, **args}.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    subprocess.run(argv, check=True, capture_output=True, timeout=300)
    return folder
