"""`lora-monitor demo`: build the offline demo in a folder and write the config that `train` runs.

Everything is made locally and deterministically: a tiny SD1.x-shaped model, tiny stand-ins for the
scoring models (same on-disk formats as the real ones), a toy garment dataset and a kohya-style trainer.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_monitor.errors import UserError

FLUX_DESCRIPTION = "a tiny FLUX.1 learns a red dress with the FLUX trainer; every checkpoint is scored live"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _table(name: str, values: dict[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def demo_config_text(paths: Any, workdir: Path) -> str:
    """The demo's config.toml; paths relative to the workdir where they live inside it."""

    def rel(p: Path) -> str:
        p = Path(p)
        try:
            return str(p.resolve().relative_to(workdir.resolve()))
        except ValueError:
            return str(p)

    args = {
        "pretrained_model_name_or_path": rel(paths.base_model),
        "train_data_dir": rel(paths.train_data_dir),
        "output_dir": "output",
        "output_name": "demo_dress",
        "logging_dir": "output/logs",
        "save_model_as": "safetensors",
        **paths.kohya_args,
    }
    eval_section = {"prompts": rel(paths.prompts), "references": rel(paths.train_data_dir), "batch_size": 4,
                    **paths.eval_settings}
    metrics = {"fashion_clip_model": rel(paths.fashion_clip), "visual_model": rel(paths.dino)}
    from lora_monitor.demo.build import SCENARIOS

    kohya = {"sd_scripts": str(paths.sd_scripts), "stop_grace_s": 10.0}
    description = SCENARIOS[paths.scenario].description
    if paths.family != "sd":  # kohya's FLUX.1 trainer; the SD demo's config names no script, as before
        kohya = {"sd_scripts": str(paths.sd_scripts), "script": paths.script, "stop_grace_s": 10.0}
        description = FLUX_DESCRIPTION
    header = f"# lora-monitor demo: {description}.\n# Paths are relative to this file.\n\n"
    return (
        header
        + _table("kohya", kohya)
        + "\n" + _table("kohya.args", args)
        + "\n" + _table("eval", eval_section)
        + "\n" + _table("metrics", metrics)
        + "\n" + _table("early_stopping", paths.early_stopping)
        # lora-monitor's metrics beside kohya's loss in TensorBoard
        + "\n" + _table("output", {"report": True, "tensorboard": True})
    )


def prepare_demo(workdir: Path | None, echo: Callable[[str], None] = print, scenario: str = "default",
                 family: str = "sd") -> Path:
    """Build (or reuse) the demo in `workdir` and return its config.toml. A finished run's output is moved aside.

    `scenario`: a key of `build.SCENARIOS` ("default", or "overtrain": one image trained far too long).
    `family`: "sd" (tiny SD 1.x, train_network.py) or "flux" (tiny FLUX.1, flux_train_network.py).
    """
    from lora_monitor.demo.build import build_demo
    from lora_monitor.evaluation.worker import quiet_libraries

    quiet_libraries()
    if workdir is None:
        workdir = Path(tempfile.mkdtemp(prefix="lora-monitor-demo-", dir=Path.cwd()))
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    label = "" if scenario == "default" else f" (scenario {scenario})"
    label += " (FLUX.1)" if family == "flux" else ""
    echo(f"building the offline demo{label} in {workdir}")
    try:
        paths = build_demo(workdir, scenario, family)
    except ValueError as exc:  # a scenario the family has not
        raise UserError(str(exc)) from None
    config = workdir / "config.toml"
    config.write_text(demo_config_text(paths, workdir), encoding="utf-8")
    output = workdir / "output"
    if output.exists() and any(output.iterdir()):
        n = 1
        while (workdir / f"output.previous-{n}").exists():
            n += 1
        output.rename(workdir / f"output.previous-{n}")
        echo(f"an earlier demo run was moved to output.previous-{n}")
    echo(f"config: {config}")
    return config
