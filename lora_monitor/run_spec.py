"""Everything a run needs, worked out once from the TOML and kohya's own files into one frozen object.

kohya reads its options from the command line over its `--config_file` (how the kohya_ss GUI launches it)
and its images from `--dataset_config` or `--train_data_dir`; `RunSpec` resolves all of that in one place.
The loops, the policies, the report and eval-dir read the run's folders, names and settings only from here.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_monitor.config import Config, EvalConfig, KohyaConfig
from lora_monitor.errors import UserError
from lora_monitor.families import BY_NAME, family_of_lora, family_of_model_folder, run_family
from lora_monitor.policies.eval_schedule import EvalSchedule, EveryCheckpoint

CSV_NAME = "loss_tracker.csv"
EVAL_FOLDER = "eval"  # <output_dir>/eval/<checkpoint stem>/: the images and manifest of one checkpoint
KOHYA_DEFAULT_NAME = "last"  # kohya's final file without output_name (train_util.DEFAULT_LAST_OUTPUT_NAME)


@dataclass(frozen=True)
class RunSpec:
    """A run's settings. `kohya` holds the argv-ready config of `train` (None for eval-dir)."""

    config: Config
    output_dir: Path
    output_name: str | None  # kohya's output_name; None: not known (eval-dir without kohya settings)
    csv_path: Path
    logging_dir: Path | None  # where kohya's TensorBoard runs are; None: kohya logs none
    base_model: str | None
    sdxl: bool
    reference_dirs: tuple[Path, ...]  # kohya's training image folders, or [eval] references
    kohya: KohyaConfig | None = None
    kohya_args: tuple[tuple[str, Any], ...] = ()  # what kohya trains with: [kohya.args] over its config_file
    resolution: tuple[int, int] | None = None  # (width, height) kohya trains at; None: not known
    family: str = "sd"  # the model family kohya trains (lora_monitor.families): its script's, else [kohya] sdxl
    # the separate model files kohya assembles a transformer family's base model from (MODEL_PART_ARGS)
    model_parts: tuple[tuple[str, str], ...] = ()

    @property
    def eval_config(self) -> EvalConfig:
        """[eval] with the image size of prompts that give none: [eval] width/height, else the resolution
        kohya trains at (None left: the base model's own size); and the system prompt kohya trains Lumina 2 with."""
        ev = self.config.eval
        width, height = self.resolution or (None, None)
        system = ev.system_prompt if ev.system_prompt is not None else str(self.arg("system_prompt") or "")
        return dataclasses.replace(ev, width=ev.width or width, height=ev.height or height, system_prompt=system)

    @property
    def best_name(self) -> str:
        from lora_monitor.policies.best_checkpoint import best_file_name

        return best_file_name(self.output_name or KOHYA_DEFAULT_NAME)

    @property
    def cache_dir(self) -> Path:
        return self.config.metrics.cache_dir or self.output_dir / EVAL_FOLDER / ".cache"

    def eval_folder(self, checkpoint: Path | str) -> Path:
        return eval_folder(self.output_dir, checkpoint)

    def schedule(self) -> EvalSchedule | EveryCheckpoint:
        """[eval] every_n_steps or dynamic_schedule; with neither, every checkpoint kohya saves."""
        ev = self.config.eval
        if ev.dynamic_schedule:
            return EvalSchedule(dynamic=[(int(a), int(b)) for a, b in ev.dynamic_schedule])
        if ev.every_n_steps:
            return EvalSchedule(every_n_steps=ev.every_n_steps)
        return EveryCheckpoint()

    def arg(self, key: str) -> Any:
        return dict(self.kohya_args).get(key)


def eval_folder(output_dir: Path, checkpoint: Path | str) -> Path:
    """Where the images of one checkpoint are kept (the report and eval-dir read them back from here)."""
    return Path(output_dir) / EVAL_FOLDER / Path(checkpoint).stem


def _path(value: object, base: Path) -> Path | None:
    if not value:
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _base_model(config: Config, args: dict[str, Any], base: Path) -> str | None:
    if config.eval.base_model:
        return config.eval.base_model
    value = args.get("pretrained_model_name_or_path")
    if not value:
        return None
    from lora_monitor.kohya.preflight import looks_local

    return str(_path(value, base)) if looks_local(str(value), base) else str(value)


# the separate model files of kohya's transformer-family trainers: flux_ (clip_l, t5xxl, ae), sd3_ (clip_l, clip_g,
# t5xxl, vae), lumina_ (gemma2, ae), hunyuan_image_ (text_encoder, byt5, vae), anima_ (qwen3, vae, llm_adapter_path,
# t5_tokenizer_path), and where they find their tokenizers
MODEL_PART_ARGS = ("clip_l", "clip_g", "t5xxl", "ae", "vae", "tokenizer_cache_dir", "gemma2", "text_encoder", "byt5",
                   "qwen3", "llm_adapter_path", "t5_tokenizer_path")


def _model_parts(args: dict[str, Any], base: Path) -> tuple[tuple[str, str], ...]:
    return tuple((key, str(_path(args[key], base))) for key in MODEL_PART_ARGS if args.get(key))


def _reference_dirs(config: Config, kohya: KohyaConfig | None) -> tuple[Path, ...]:
    if config.eval.references is not None:
        return (config.eval.references,)
    if kohya is None:
        return ()
    from lora_monitor.kohya.args import effective_args, kohya_cwd, train_data_dirs

    dirs = train_data_dirs(kohya)
    if not dirs:  # no DreamBooth sub-folders: the images lie in train_data_dir itself
        folder = _path(effective_args(kohya).get("train_data_dir"), kohya_cwd(kohya))
        dirs = [folder] if folder else []
    return tuple(dirs)


def parse_resolution(value: object) -> tuple[int, int] | None:
    """(width, height) from kohya's `resolution`: "512" or "512,768" on its command line or config_file
    (train_util.prepare_dataset_args splits on ","), 512 or [512, 768] in a dataset_config. None when absent
    or not a size (kohya reports that itself)."""
    if isinstance(value, str):
        parts: list[object] = [p.strip() for p in value.split(",")]
    elif isinstance(value, list | tuple):
        parts = list(value)
    else:
        parts = [value]
    try:
        numbers = [int(p) for p in parts if not isinstance(p, bool | float)]  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    if len(numbers) != len(parts) or len(numbers) not in (1, 2) or min(numbers) <= 0:
        return None
    return (numbers[0], numbers[-1])


def _kohya_resolution(args: dict[str, Any], base: Path) -> tuple[int, int] | None:
    """As kohya's config_util picks it: the (first) dataset's own value, then [general], then the argument."""
    if args.get("dataset_config"):
        from lora_monitor.kohya.args import read_dataset_config

        config = read_dataset_config(_path(args["dataset_config"], base))  # type: ignore[arg-type]
        datasets = config.get("datasets") or [{}]
        for table in (datasets[0], config.get("general")):
            size = parse_resolution(table.get("resolution")) if isinstance(table, dict) else None
            if size:
                return size
    return parse_resolution(args.get("resolution"))


def metadata_resolution(metadata: dict[str, str]) -> tuple[int, int] | None:
    """The training size a kohya LoRA records: `ss_resolution` "(512, 512)" (str of kohya's tuple), else the
    first of `ss_datasets` (dataset_config runs), else `modelspec.resolution` "512x512"."""
    size = _numbers(metadata.get("ss_resolution", ""))
    if size is None and metadata.get("ss_datasets"):
        try:
            datasets = json.loads(metadata["ss_datasets"])
            size = parse_resolution(datasets[0].get("resolution")) if datasets else None
        except (ValueError, TypeError, AttributeError, IndexError):
            size = None
    return size or _numbers(metadata.get("modelspec.resolution", ""))


def _numbers(text: str) -> tuple[int, int] | None:
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    return (numbers[0], numbers[1]) if len(numbers) == 2 and min(numbers) > 0 else None


def _folder_resolution(folder: Path) -> tuple[int, int] | None:
    """The training size recorded in the newest LoRA file of `folder` that records one."""
    from lora_monitor.checkpoints.files import read_header
    from lora_monitor.checkpoints.watcher import list_checkpoints

    for path in sorted(list_checkpoints(folder), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            size = metadata_resolution(read_header(path).metadata)
        except (OSError, ValueError):
            continue
        if size:
            return size
    return None


def train_spec(config: Config) -> RunSpec:
    """The spec of `train`: kohya's effective arguments decide the folders and names."""
    from lora_monitor.kohya.args import effective_args, kohya_cwd

    if config.kohya is None:
        raise UserError(f"{config.source}: no [kohya] section; add [kohya] with sd_scripts and [kohya.args]")
    args = effective_args(config.kohya)
    base = kohya_cwd(config.kohya)
    output_dir = _path(args.get("output_dir"), base)
    if output_dir is None:
        raise UserError(f"{config.source}: kohya.args.output_dir is not set; add it (kohya needs it too)")
    kohya = config.kohya
    family = run_family(kohya.script, kohya.sdxl)  # sdxl_train_network.py means SDXL without `sdxl = true`
    logging_dir = _path(args.get("logging_dir"), base)
    if logging_dir is None and args.get("log_with") != "wandb":
        # kohya prints no learning rate; its TensorBoard logs have it, so make sure it writes them
        logging_dir = output_dir / "logs"
        kohya = dataclasses.replace(kohya, args={**kohya.args, "logging_dir": str(logging_dir)})
        args = {**args, "logging_dir": str(logging_dir)}
    return RunSpec(
        config=config,
        output_dir=output_dir,
        output_name=str(args["output_name"]) if args.get("output_name") else None,
        csv_path=config.output.csv or output_dir / CSV_NAME,
        logging_dir=logging_dir,
        base_model=_base_model(config, args, base),
        sdxl=family == "sdxl",
        reference_dirs=_reference_dirs(config, config.kohya),
        kohya=kohya,
        kohya_args=tuple(args.items()),
        resolution=_kohya_resolution(args, base),
        family=family,
        model_parts=_model_parts(args, base),
    )


def eval_dir_spec(config: Config, folder: Path, csv_path: Path | None = None) -> RunSpec:
    """The spec of `eval-dir FOLDER`: the config's kohya settings describe the folder only when the folder is
    that run's output_dir; otherwise its logs are looked for in FOLDER/logs and names come from the files."""
    folder = folder.resolve()
    args: dict[str, Any] = {}
    base = folder
    if config.kohya is not None:
        from lora_monitor.kohya.args import effective_args, kohya_cwd

        args, base = effective_args(config.kohya), kohya_cwd(config.kohya)
    own_run = _path(args.get("output_dir"), base) == folder
    family = run_family(config.kohya.script, config.kohya.sdxl) if config.kohya else None
    base_model = _base_model(config, args, base)
    family = family or _eval_dir_family(base_model, folder)
    logging_dir = _path(args.get("logging_dir"), base) if own_run else None
    return RunSpec(
        config=config,
        output_dir=folder,
        output_name=str(args["output_name"]) if own_run and args.get("output_name") else None,
        csv_path=csv_path or config.output.csv or folder / CSV_NAME,
        logging_dir=logging_dir or folder / "logs",
        base_model=base_model,
        sdxl=family == "sdxl",
        reference_dirs=_reference_dirs(config, config.kohya),
        kohya=None,
        kohya_args=tuple(args.items()),
        resolution=(_own_resolution(args, base) if own_run else None) or _folder_resolution(folder),
        family=family,
        model_parts=_model_parts(args, base),
    )


def _eval_dir_family(base_model: str | None, folder: Path) -> str:
    """eval-dir without [kohya]: the family of the base model folder (its model_index.json's pipeline class), else
    of the newest LoRA file that names one (ss_base_model_version, else its key layout), else SD. A family
    lora-monitor cannot evaluate falls back to SD, whose rows then name both families instead of scoring."""
    family = family_of_model_folder(base_model) or _folder_family(folder)
    return family if family in BY_NAME and BY_NAME[family].supported else "sd"


def _folder_family(folder: Path) -> str | None:
    from lora_monitor.checkpoints.files import read_header
    from lora_monitor.checkpoints.watcher import list_checkpoints

    for path in sorted(list_checkpoints(folder), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            header = read_header(path)
        except (OSError, ValueError):
            continue
        if family := family_of_lora(header.tensors, header.metadata):
            return family
    return None


def _own_resolution(args: dict[str, Any], base: Path) -> tuple[int, int] | None:
    """eval-dir of the config's own run: a dataset_config gone since training leaves the files to say."""
    try:
        return _kohya_resolution(args, base)
    except UserError:
        return None
