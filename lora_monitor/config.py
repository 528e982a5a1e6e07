"""Typed, strict TOML configuration: one place knows every key, its type and its default.

An unknown key or a wrong type is a UserError naming the file, the key and the closest valid key.
Relative paths are resolved against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_monitor.columns import DEFAULT_WEIGHTS, LOSS_KEYS, MONITORABLE
from lora_monitor.errors import UserError
from lora_monitor.families import check_run
from lora_monitor.policies import overtraining

# kohya arguments whose values are paths; relative ones are resolved against the config file.
KOHYA_PATH_ARGS = frozenset(
    {
        "pretrained_model_name_or_path",
        "train_data_dir",
        "reg_data_dir",
        "output_dir",
        "logging_dir",
        "dataset_config",
        "config_file",
        "sample_prompts",
        "network_weights",
        "tokenizer_cache_dir",
        "vae",
        "resume",
        "clip_l",  # the transformer families' separate model files (flux_, sd3_, lumina_, hunyuan_image_, anima_...)
        "clip_g",
        "t5xxl",
        "ae",
        "gemma2",
        "text_encoder",
        "byt5",
        "qwen3",
        "llm_adapter_path",
        "t5_tokenizer_path",
    }
)


# [eval] scheduler: name -> diffusers class ("default" keeps the base model's own scheduler).
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


@dataclass(frozen=True)
class KohyaConfig:
    sd_scripts: Path
    args: dict[str, Any] = field(default_factory=dict)
    script: str | None = None
    sdxl: bool = False
    launcher: str = "python"
    python: str | None = None
    accelerate: dict[str, Any] = field(default_factory=dict)
    stop_grace_s: float = 30.0


@dataclass(frozen=True)
class EvalConfig:
    enabled: bool = True
    prompts: Path | None = None
    # kohya prompt file of prompts the captions never had (clip_t_holdout); unset: built from the captions'
    # trigger words and sample_prompts/holdout_contexts.list
    holdout_prompts: Path | None = None
    holdout: bool = True  # false: no held-out prompts at all (no clip_t_holdout)
    references: Path | None = None
    base_model: str | None = None
    device: str = "auto"
    memory: str = "auto"
    batch_size: int = 4
    steps: int | None = None  # unset: the family's default (SD/SDXL 15, FLUX.1-dev 20, schnell 4: pipelines.py)
    guidance_scale: float | None = None  # unset: SD/SDXL CFG 7.0, FLUX.1-dev guidance embedding 3.5
    scheduler: str = "default"
    width: int | None = None
    height: int | None = None
    seed: int = 42
    negative_prompt: str = ""
    every_n_steps: int | None = None
    dynamic_schedule: list[list[int]] | None = None
    newest_first: bool = True
    backfill: bool = True
    # images per evaluation prompt, each with its own seed: 2 or more measure diversity (1: no diversity)
    seeds_per_prompt: int = 2
    # LoRA scales each checkpoint is also evaluated at (strengths.csv); the CSV row is always at 1.0
    strengths: list[float] = field(default_factory=lambda: [1.0])
    # where a checkpoint's images come from: "generate" (lora-monitor loads the base model and generates) or
    # "kohya_samples" (the images kohya writes to <output_dir>/sample/; no diffusion model is loaded)
    source: str = "generate"
    # Lumina 2's system prompt before each prompt; unset: kohya's --system_prompt (its default "": the bare prompt)
    system_prompt: str | None = None


# [eval] source values
EVAL_SOURCES = ("generate", "kohya_samples")


@dataclass(frozen=True)
class MetricsConfig:
    fashion_clip_model: str = "hf-hub:Marqo/marqo-fashionCLIP"
    visual_model: str = "facebook/dino-vits16"
    weights: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_WEIGHTS)
    )
    cache_dir: Path | None = None
    # Copy distance below which a generated image counts as a copy of a training image: Carlini et al.
    # 2023's δ, calibrated in tests/evaluation/test_memorisation.py (= memorisation.COPY_THRESHOLD).
    copy_threshold: float = 0.15


@dataclass(frozen=True)
class EarlyStoppingConfig:
    enabled: bool = False
    monitor: str = "eval_score"
    mode: str | None = None
    patience: int = 3
    min_delta: float = 0.0
    min_step: int = 0
    # stop after `patience` evaluations in a row flagged as over-trained ([best] bounds), even when
    # `enabled` (the monitor's rule) is off
    overtraining: bool = False


@dataclass(frozen=True)
class BestConfig:
    """How the best checkpoint is chosen, and the bounds past which a checkpoint counts as over-trained."""

    rule: str = "not_overtrained"  # or "lowest_score": the lowest eval_score, flags ignored
    max_copies: int = overtraining.MAX_COPIES
    diversity_fraction: float = overtraining.DIVERSITY_FRACTION
    holdout_margin: float = overtraining.HOLDOUT_MARGIN
    val_loss_margin: float = overtraining.VAL_LOSS_MARGIN

    def bounds(self) -> overtraining.Bounds:
        return overtraining.Bounds(diversity_fraction=self.diversity_fraction, holdout_margin=self.holdout_margin,
                                   val_loss_margin=self.val_loss_margin, max_copies=self.max_copies)


@dataclass(frozen=True)
class OutputConfig:
    csv: Path | None = None
    report: bool = True
    tensorboard: bool = False


@dataclass(frozen=True)
class Config:
    kohya: KohyaConfig | None = None
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    best: BestConfig = field(default_factory=BestConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    source: Path | None = None
    text: str = ""


SECTIONS: dict[str, type] = {
    "kohya": KohyaConfig,
    "eval": EvalConfig,
    "metrics": MetricsConfig,
    "early_stopping": EarlyStoppingConfig,
    "best": BestConfig,
    "output": OutputConfig,
}


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"did you mean '{match[0]}'?" if match else f"valid keys: {', '.join(valid)}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Return value converted to tp (str -> Path), or raise UserError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        errors = []
        for arg in args:
            try:
                return _check_value(value, arg, where)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is Path:
        if isinstance(value, str) and value:
            return Path(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (inner,) = typing.get_args(tp)
            return [_check_value(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            _, inner = typing.get_args(tp)
            return {k: _check_value(v, inner, f"{where}.{k}") if inner is not Any else v for k, v in value.items()}
    else:  # pragma: no cover - a schema bug, not user input
        raise TypeError(f"unsupported config type {tp}")
    raise UserError(
        f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}; fix the value's type"
    )


def _load_section(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table [{where.split(': ')[-1]}], got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise UserError(f"{where}.{key}: unknown key; {_closest(key, list(fields))}")
        values[key] = _check_value(value, hints[key], f"{where}.{key}")
    missing = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in values
    ]
    if missing:
        raise UserError(f"{where}: missing required key '{missing[0]}'; add it to the table")
    return cls(**values)


def _resolve(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _looks_like_path(value: str, base: Path) -> bool:
    """A hub id such as `runwayml/stable-diffusion-v1-5` stays as it is; local paths are resolved."""
    if value.startswith(("/", "./", "../", "~")) or "\\" in value:
        return True
    return (base / value).exists()


def _resolve_kohya(kohya: KohyaConfig, base: Path) -> KohyaConfig:
    args = dict(kohya.args)
    for key, value in args.items():
        if key in KOHYA_PATH_ARGS and isinstance(value, str) and value:
            if key == "pretrained_model_name_or_path" and not _looks_like_path(value, base):
                continue
            args[key] = str(_resolve(Path(value), base))
    return dataclasses.replace(kohya, sd_scripts=_resolve(kohya.sd_scripts, base), args=args)


def parse_config(text: str, source: Path) -> Config:
    """Parse TOML text as if read from `source` (used for paths and messages)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{source}: not valid TOML ({exc}); fix the syntax at that line") from None
    base = source.parent.resolve()
    sections: dict[str, Any] = {}
    for name, table in data.items():
        if name not in SECTIONS:
            raise UserError(f"{source}: unknown section [{name}]; {_closest(name, list(SECTIONS))}")
        sections[name] = _load_section(SECTIONS[name], table, f"{source}: {name}")
    if "kohya" in sections:
        sections["kohya"] = _resolve_kohya(sections["kohya"], base)
    if "eval" in sections:
        ev = sections["eval"]
        base_model = ev.base_model
        if base_model and _looks_like_path(base_model, base):
            base_model = str(_resolve(Path(base_model), base))
        sections["eval"] = dataclasses.replace(
            ev, prompts=_resolve(ev.prompts, base), references=_resolve(ev.references, base), base_model=base_model,
            holdout_prompts=_resolve(ev.holdout_prompts, base),
        )
    if "metrics" in sections:
        sections["metrics"] = _resolve_metrics(sections["metrics"], base, source)
    if "output" in sections:
        sections["output"] = dataclasses.replace(sections["output"], csv=_resolve(sections["output"].csv, base))
    config = Config(**sections, source=source.resolve(), text=text)
    validate(config)
    return config


def _resolve_metrics(metrics: MetricsConfig, base: Path, source: Path) -> MetricsConfig:
    models = {}
    for key in ("fashion_clip_model", "visual_model"):
        value = getattr(metrics, key)
        models[key] = str(_resolve(Path(value), base)) if _looks_like_path(value, base) else value
    valid = set(LOSS_KEYS)
    for key in metrics.weights:
        if key not in valid:
            raise UserError(f"{source}: metrics.weights.{key}: unknown metric; {_closest(key, sorted(valid))}")
    weights = {**dict.fromkeys(LOSS_KEYS, 0.0), **metrics.weights}
    return dataclasses.replace(metrics, **models, weights=weights, cache_dir=_resolve(metrics.cache_dir, base))


def validate(config: Config) -> None:
    """Value checks beyond types: ranges and choices."""
    where = config.source or Path("config")
    ev = config.eval
    for key in ("batch_size", "steps", "every_n_steps", "width", "height"):
        value = getattr(ev, key)
        if value is not None and value <= 0:
            raise UserError(f"{where}: eval.{key} = {value}: must be a positive whole number")
    if ev.seeds_per_prompt < 1:
        raise UserError(f"{where}: eval.seeds_per_prompt = {ev.seeds_per_prompt}: must be 1 or more "
                        "(1 turns the diversity column off)")
    for s in ev.strengths:
        if not math.isfinite(s) or not 0 < s <= 4:
            raise UserError(f"{where}: eval.strengths has {s}: each LoRA scale must be in (0, 4]")
    if not ev.strengths:
        raise UserError(f"{where}: eval.strengths = []: list at least one LoRA scale (e.g. [1.0])")
    if ev.guidance_scale is not None and ev.guidance_scale < 0:
        raise UserError(f"{where}: eval.guidance_scale = {ev.guidance_scale}: must be >= 0")
    if ev.scheduler != "default" and ev.scheduler not in SCHEDULERS:
        raise UserError(f"{where}: eval.scheduler = {ev.scheduler!r}: unknown; "
                        f"{_closest(ev.scheduler, ['default', *SCHEDULERS])} (valid: default, {', '.join(SCHEDULERS)})")
    weights = config.metrics.weights
    for key, value in weights.items():
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{where}: metrics.weights.{key} = {value}: must be a number >= 0")
    if weights and sum(weights.values()) == 0:
        raise UserError(f"{where}: metrics.weights: all are 0; give at least one of {', '.join(LOSS_KEYS)} "
                        "a weight > 0")
    threshold = config.metrics.copy_threshold
    if not math.isfinite(threshold) or not 0 < threshold <= 1:
        raise UserError(f"{where}: metrics.copy_threshold = {threshold}: must be in (0, 1] (a tiled RMS pixel "
                        "distance; 0.15 is the published default)")
    _validate_source(config, where)
    if ev.memory not in ("auto", "full", "offload"):
        raise UserError(f"{where}: eval.memory = {ev.memory!r}: use 'auto', 'full' or 'offload'")
    if not (ev.device in ("auto", "cpu", "cuda") or ev.device.startswith("cuda:")):
        raise UserError(f"{where}: eval.device = {ev.device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    for i, pair in enumerate(ev.dynamic_schedule or []):
        if len(pair) != 2 or pair[0] <= 0 or pair[1] <= 0:
            raise UserError(
                f"{where}: eval.dynamic_schedule[{i}] = {pair}: use [until_step, every] with positive numbers"
            )
    es = config.early_stopping
    if es.monitor not in MONITORABLE:
        raise UserError(
            f"{where}: early_stopping.monitor = {es.monitor!r} is not a metric; "
            f"{_closest(es.monitor, sorted(MONITORABLE))} (valid: {', '.join(sorted(MONITORABLE))})"
        )
    if es.mode not in (None, "min", "max"):
        raise UserError(f"{where}: early_stopping.mode = {es.mode!r}: use 'min' or 'max'")
    if es.patience < 0 or es.min_step < 0 or es.min_delta < 0:
        raise UserError(f"{where}: early_stopping patience, min_step and min_delta must be >= 0")
    _validate_best(config.best, where)
    if config.kohya:
        k = config.kohya
        if k.launcher not in ("python", "accelerate"):
            raise UserError(f"{where}: kohya.launcher = {k.launcher!r}: use 'python' or 'accelerate'")
        if k.stop_grace_s <= 0:
            raise UserError(f"{where}: kohya.stop_grace_s = {k.stop_grace_s}: must be > 0 seconds")
        if problem := check_run(k.script, k.sdxl):  # a family lora-monitor cannot evaluate: say so before kohya runs
            raise UserError(f"{where}: {problem}")
        for key in ("save_every_n_steps", "save_every_n_epochs", "max_train_steps"):
            value = k.args.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
                raise UserError(f"{where}: kohya.args.{key} = {value}: must be a positive whole number")


def _validate_source(config: Config, where: Path) -> None:
    """[eval] source: a known value; kohya_samples needs kohya to sample (when [kohya] is set) and one scale."""
    ev = config.eval
    if ev.source not in EVAL_SOURCES:
        raise UserError(f"{where}: eval.source = {ev.source!r}: unknown; {_closest(ev.source, list(EVAL_SOURCES))} "
                        f"(valid: {', '.join(EVAL_SOURCES)})")
    if ev.source != "kohya_samples":
        return
    if ev.strengths != [1.0]:
        raise UserError(f"{where}: eval.strengths = {ev.strengths}: kohya's samples are at the LoRA's trained scale "
                        "only; remove eval.strengths when eval.source = 'kohya_samples'")
    args = config.kohya.args if config.kohya else {}
    if not (args.get("sample_prompts") or ev.prompts or "config_file" in args):  # a config_file may set it
        raise UserError(f"{where}: eval.source = 'kohya_samples' needs kohya's prompt file; set "
                        "kohya.args.sample_prompts (train) or [eval] prompts (eval-dir) to the file kohya samples with")


def _validate_best(best: BestConfig, where: Path) -> None:
    if best.rule not in ("not_overtrained", "lowest_score"):
        raise UserError(f"{where}: best.rule = {best.rule!r}: unknown; "
                        f"{_closest(best.rule, ['not_overtrained', 'lowest_score'])} "
                        "(valid: not_overtrained, lowest_score)")
    if best.max_copies < 0:
        raise UserError(f"{where}: best.max_copies = {best.max_copies}: must be >= 0 (0: any copy flags)")
    if not 0 <= best.diversity_fraction <= 1:
        raise UserError(f"{where}: best.diversity_fraction = {best.diversity_fraction}: must be in [0, 1] "
                        "(a fraction of the base model's diversity; 0 turns the check off)")
    for key in ("holdout_margin", "val_loss_margin"):
        value = getattr(best, key)
        if math.isnan(value) or value < 0:
            raise UserError(f"{where}: best.{key} = {value}: must be a number >= 0 (inf turns the check off)")


def load_config(path: Path) -> Config:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: config file not found; check the path given to --config")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a config file; pass the .toml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read config ({exc}); check permissions and encoding") from None
    return parse_config(text, path)
