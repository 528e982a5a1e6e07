"""What evaluation needs from the user, checked before training starts: the scoring models (offline), the
base model, the reference images and the prompts."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lora_monitor.config import Config
from lora_monitor.errors import UserError
from lora_monitor.evaluation.prompts import Prompt, load_holdout_prompts, load_prompts, prompts_from_captions

if TYPE_CHECKING:
    from lora_monitor.run_spec import RunSpec


@dataclass(frozen=True)
class Inputs:
    """What evaluation needs from the user, checked before training starts."""

    references: list[Path]
    prompts: list[Prompt]
    holdout: list[Prompt] = field(default_factory=list)  # clip_t_holdout's prompts; [] turns it off


# Built-in held-out prompts (no [eval] holdout_prompts): the first contexts of the shipped list. Each costs
# one image per checkpoint; a prompt file given by the user is used whole.
BUILT_IN_HOLDOUT = 4


def check_inputs(spec: RunSpec) -> Inputs:
    """Fail fast (before training starts): models available offline, references found, prompts readable."""
    from lora_monitor.evaluation.metrics import check_model_available

    config = spec.config
    check_model_available(config.metrics.fashion_clip_model, "fashion_clip")
    check_model_available(config.metrics.visual_model, "visual")
    base = spec.base_model
    if not base:
        raise UserError("no base model: set [eval] base_model or kohya.args.pretrained_model_name_or_path")
    if ("/" in base or os.sep in base) and Path(base).is_absolute() and not Path(base).exists():
        raise UserError(f"base model {base}: not found; fix [eval] base_model or pretrained_model_name_or_path")
    references = reference_images(spec)
    return Inputs(references=references, prompts=resolve_prompts(config, references),
                  holdout=resolve_holdout(config, references))


def resolve_holdout(config: Config, references: list[Path]) -> list[Prompt]:
    from lora_monitor.evaluation.references import read_captions

    if not config.eval.holdout:
        return []
    captions = read_captions(references)
    prompts = load_holdout_prompts(config.eval.holdout_prompts, captions)
    return prompts if config.eval.holdout_prompts else prompts[:BUILT_IN_HOLDOUT]


def resolve_prompts(config: Config, references: list[Path]) -> list[Prompt]:
    if config.eval.prompts:
        return load_prompts(config.eval.prompts)
    from lora_monitor.evaluation.references import read_captions

    prompts = prompts_from_captions(read_captions(references))
    if not prompts:
        raise UserError(
            "no prompts: set [eval] prompts to a kohya prompt file, or give the reference images .txt captions"
        )
    return prompts


def reference_images(spec: RunSpec) -> list[Path]:
    """[eval] references, else the image folders kohya trains on (train_data_dir's N_name folders or the
    dataset_config subsets), searched recursively."""
    from lora_monitor.evaluation.references import find_reference_images

    if not spec.reference_dirs:
        raise UserError("no reference images: set [eval] references or kohya.args.train_data_dir")
    if len(spec.reference_dirs) == 1:
        return find_reference_images(spec.reference_dirs[0])
    return sorted({p for d in spec.reference_dirs for p in find_reference_images(d)})
