"""kohya's arguments as kohya will see them: [kohya.args] over kohya's own `config_file`, its dataset folders,
and the argv list that starts it (never a shell string).

Relative paths inside kohya's own config files are relative to kohya's working directory, which the
launcher sets to `kohya.sd_scripts` (see `kohya_cwd`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_monitor.errors import UserError

if TYPE_CHECKING:
    from lora_monitor.config import KohyaConfig

ARG_KEY_RE = re.compile(r"[A-Za-z_][\w-]*")


def kohya_cwd(kohya: KohyaConfig) -> Path:
    """The working directory kohya runs in (relative paths in its config files are relative to it)."""
    return Path(kohya.sd_scripts)


def script_path(kohya: KohyaConfig) -> Path:
    name = kohya.script or ("sdxl_train_network.py" if kohya.sdxl else "train_network.py")
    return Path(name) if Path(name).is_absolute() else Path(kohya.sd_scripts) / name


# -- arguments -----------------------------------------------------------------------------------------


def resolve_path(value: str, base: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def read_kohya_config_file(path: Path) -> dict[str, Any]:
    """kohya's `--config_file` as kohya reads it (train_util.read_config_from_file): `.toml` appended when
    missing; top-level tables flattened into one namespace, top-level plain values kept as they are."""
    if not path.name.endswith(".toml"):
        path = path.with_name(path.name + ".toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"kohya config_file {path} not found; fix kohya.args.config_file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"kohya config_file {path} cannot be read ({exc}); check the file") from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"kohya config_file {path}: not valid TOML ({exc}); fix the syntax there") from None
    flat: dict[str, Any] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[name] = value
    return flat


def effective_args(kohya: KohyaConfig) -> dict[str, Any]:
    """The arguments kohya trains with: [kohya.args] over the values of kohya's own `config_file`.

    kohya parses the command line into a namespace pre-filled from `config_file`, so a given option wins
    over the file. `false`, empty lists and None are never put on the command line (see `build_argv`), so
    they cannot switch off what the file sets: the file's value stays.
    """
    cli = dict(kohya.args)
    merged: dict[str, Any] = {}
    if cli.get("config_file"):
        merged.update(read_kohya_config_file(resolve_path(str(cli["config_file"]), kohya_cwd(kohya))))
    for key, value in cli.items():
        if on_command_line(value):
            merged[key] = value
        else:
            merged.setdefault(key, value)
    return merged


def on_command_line(value: object) -> bool:
    return value is not None and value is not False and value != [] and value != ()


def read_dataset_config(path: Path) -> dict[str, Any]:
    """kohya's `--dataset_config` (.toml or .json, config_util.load_user_config)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"kohya dataset_config {path} not found; fix kohya.args.dataset_config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"kohya dataset_config {path} cannot be read ({exc}); check the file") from None
    try:
        if path.name.lower().endswith(".json"):
            return json.loads(text)
        return tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"kohya dataset_config {path}: cannot be parsed ({exc}); fix the syntax") from None


def train_data_dirs(kohya: KohyaConfig) -> list[Path]:
    """The folders of training images kohya will use (regularisation images excluded), as kohya finds them.

    With `dataset_config`: every subset's `image_dir` unless `is_reg`. Otherwise with `train_data_dir`:
    the DreamBooth sub-folders named `<repeats>_<name>` (repeats >= 1), or the folder itself with `in_json`.
    """
    args, base = effective_args(kohya), kohya_cwd(kohya)
    dirs: list[Path] = []
    if args.get("dataset_config"):
        config = read_dataset_config(resolve_path(str(args["dataset_config"]), base))
        for dataset in config.get("datasets", []):
            for subset in dataset.get("subsets", []):
                if subset.get("image_dir") and not subset.get("is_reg", False):
                    dirs.append(resolve_path(str(subset["image_dir"]), base))
    elif args.get("train_data_dir"):
        root = resolve_path(str(args["train_data_dir"]), base)
        if args.get("in_json"):
            dirs.append(root)
        elif root.is_dir():
            dirs.extend(sorted(p for p in root.iterdir() if p.is_dir() and _dreambooth_repeats(p.name) >= 1))
    return list(dict.fromkeys(dirs))


def _dreambooth_repeats(name: str) -> int:
    try:
        return int(name.split("_")[0])
    except ValueError:
        return 0


def format_args(args: Mapping[str, Any], where: str) -> list[str]:
    """`--key value` per item; True -> bare `--key`; False/None/[] -> omitted; lists -> `--key v1 v2`."""
    out: list[str] = []
    for key, value in args.items():
        if not ARG_KEY_RE.fullmatch(key):
            raise UserError(f"{where}.{key}: not an option name; write it as kohya does, e.g. output_dir")
        if not on_command_line(value):
            continue
        if value is True:
            out.append(f"--{key}")
        elif isinstance(value, list | tuple):
            out += [f"--{key}", *(_scalar(v, f"{where}.{key}") for v in value)]
        else:
            out += [f"--{key}", _scalar(value, f"{where}.{key}")]
    return out


def _scalar(value: object, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Path):
        raise UserError(f"{where} = {value!r}: use a string, a number, true/false or a list of those")
    return repr(value) if isinstance(value, float) else str(value)


def build_argv(kohya: KohyaConfig) -> list[str]:
    """[python, -u, script, args...] or [accelerate, launch, accelerate args..., script, args...]."""
    python = kohya.python or sys.executable
    tail = [str(script_path(kohya)), *format_args(kohya.args, "kohya.args")]
    if kohya.launcher == "python":
        return [python, "-u", *tail]
    if kohya.launcher == "accelerate":
        return [*_accelerate(python), "launch", *format_args(kohya.accelerate, "kohya.accelerate"), *tail]
    raise UserError(f"kohya.launcher = {kohya.launcher!r}: use 'python' or 'accelerate'")


def _accelerate(python: str) -> list[str]:
    """The `accelerate` command of the Python that runs kohya (its venv's), else the one on PATH."""
    sibling = Path(python).parent / "accelerate"  # not resolved: a venv's python is a symlink
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling)]
    found = shutil.which("accelerate")
    if found:
        return [found]
    return [python, "-m", "accelerate.commands.accelerate_cli"]


# -- preflight -----------------------------------------------------------------------------------------
