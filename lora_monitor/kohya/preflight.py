"""The mistakes worth catching before kohya spends minutes loading models: a missing script, interpreter or
base model, an output folder that cannot be written, save formats lora-monitor cannot read."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from lora_monitor.errors import UserError

if TYPE_CHECKING:
    from lora_monitor.config import KohyaConfig

from lora_monitor.kohya.args import (
    effective_args,
    kohya_cwd,
    on_command_line,
    read_dataset_config,
    read_kohya_config_file,
    resolve_path,
    script_path,
)

HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def preflight(kohya: KohyaConfig) -> list[str]:
    """Check what would otherwise fail after minutes of model loading; returns warnings, raises UserError."""
    sd_scripts = Path(kohya.sd_scripts)
    if not sd_scripts.is_dir():
        raise UserError(f"kohya.sd_scripts = {sd_scripts}: not a folder; point it at your sd-scripts copy")
    script = script_path(kohya)
    if not script.is_file():
        raise UserError(f"kohya script {script} not found; check kohya.sd_scripts and kohya.script")
    if kohya.python and not Path(kohya.python).is_file():
        raise UserError(f"kohya.python = {kohya.python}: not found; give the Python with kohya's packages")
    args = effective_args(kohya)
    base = kohya_cwd(kohya)
    _check_output_dir(args.get("output_dir"), base)
    _check_base_model(args.get("pretrained_model_name_or_path"), base)
    save_as = args.get("save_model_as", "safetensors")
    if save_as != "safetensors":
        raise UserError(f"kohya save_model_as = {save_as!r}: only safetensors files can be evaluated (other "
                        "formats need unpickling); set kohya.args.save_model_as = \"safetensors\"")
    if args.get("dataset_config"):
        read_dataset_config(resolve_path(str(args["dataset_config"]), base))
    warnings = []
    if not args.get("save_every_n_steps") and not args.get("save_every_n_epochs"):
        warnings.append("kohya saves only the final LoRA (no save_every_n_steps / save_every_n_epochs): "
                        "nothing to evaluate until training ends")
    return warnings + _unoverridable(kohya)


def _unoverridable(kohya: KohyaConfig) -> list[str]:
    """Warnings for [kohya.args] values that stay off the command line, so kohya's config_file wins."""
    if not kohya.args.get("config_file"):
        return []
    file_values = read_kohya_config_file(resolve_path(str(kohya.args["config_file"]), kohya_cwd(kohya)))
    return [
        f"kohya.args.{key} = {value!r} cannot override {file_values[key]!r} from kohya's config_file (only "
        "options on the command line do); change it in that file"
        for key, value in kohya.args.items()
        if not on_command_line(value) and on_command_line(file_values.get(key))
    ]


def _check_output_dir(value: object, base: Path) -> None:
    if not value:
        raise UserError("kohya output_dir is not set; add output_dir to [kohya.args]")
    path = resolve_path(str(value), base)
    if path.exists() and not path.is_dir():
        raise UserError(f"kohya output_dir {path} is a file; point output_dir at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"kohya output_dir {path} cannot be created ({exc.strerror}); choose another "
                        "folder") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"kohya output_dir {path} is not writable ({exc.strerror}); fix its permissions or "
                        "choose another folder") from None


def looks_local(model: str, base: Path) -> bool:
    """True for a local model path (existing, absolute, relative, or a checkpoint file name); False for a hub
    id such as `runwayml/stable-diffusion-v1-5`."""
    if resolve_path(model, base).exists() or model.lower().endswith(MODEL_FILE_SUFFIXES):
        return True
    return HUB_ID_RE.fullmatch(model) is None


def _check_base_model(value: object, base: Path) -> None:
    if not value:
        raise UserError("kohya pretrained_model_name_or_path is not set; add it to [kohya.args]")
    model = str(value)
    if looks_local(model, base) and not resolve_path(model, base).exists():
        raise UserError(f"kohya pretrained_model_name_or_path {model}: not found; give an existing file or "
                        "folder (write paths in full: ~ is not expanded), or a hub id like owner/name")


# -- the process ---------------------------------------------------------------------------------------
