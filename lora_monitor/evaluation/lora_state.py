"""A LoRA file as the evaluator loads it: read as safetensors only, checked against the base model's family,
converted to what diffusers loads; the messages a failed load turns into."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from lora_monitor.checkpoints.files import NotALoraError, lora_format, read_header
from lora_monitor.checkpoints.formats import normalize_lora_state
from lora_monitor.errors import EvalError
from lora_monitor.families import family_of_lora, mismatch

log = logging.getLogger(__name__)


_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.")
_LOADER_LOGGERS = ("diffusers", "transformers", "peft")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def load_lora_state(path: Path, base_family: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA of `path` in the form diffusers reads; EvalError (reason) for a file that is none, or that is
    for another model family than `base_family` (its metadata, else its key layout, says which)."""
    from safetensors.torch import load_file

    try:
        header = read_header(path)
    except FileNotFoundError:
        raise EvalError("file deleted before its turn") from None
    except (OSError, ValueError) as exc:
        raise EvalError(f"not a readable safetensors file ({exc})") from None
    try:
        lora_format(header)
    except NotALoraError as exc:
        # A cheap refusal from the header alone (e.g. a full model); other layouts are judged below.
        if "no LoRA tensors" in str(exc) or "no tensors" in str(exc):
            raise EvalError(f"not a LoRA: {exc}") from None
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise EvalError(f"corrupt safetensors file ({first_line(exc)})") from None
    if base_family and (note := mismatch(family_of_lora(state, header.metadata), base_family)):
        raise EvalError(note)
    try:
        # kohya, diffusers/peft, ai-toolkit and OneTrainer layouts -> what diffusers' loader reads
        return normalize_lora_state(state, header.metadata)
    except NotALoraError as exc:
        raise EvalError(f"not a LoRA lora-monitor can load: {exc}") from None


def touches_text_encoder(keys: list[str]) -> bool:
    return any(k.startswith(_TE_PREFIXES) for k in keys)


def lora_layer_count(keys: list[str]) -> int:
    """Number of LoRA layers in a state dict (one down/A matrix each); 0 for layouts counted otherwise."""
    return sum(k.endswith((".lora_down.weight", ".lora_A.weight")) for k in keys)


def lora_signature(state: dict[str, torch.Tensor]) -> frozenset[tuple[str, tuple[int, ...]]]:
    return frozenset((k, tuple(v.shape)) for k, v in state.items() if not k.endswith(".alpha"))


def load_failure(exc: BaseException) -> str:
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if "size mismatch" in line]
    if lines or "shape" in text.lower():
        return f"does not fit the base model (shape mismatch: {(lines or [first_line(exc)])[0][:300]})"
    if "not found in the base model" in text or type(exc).__name__ == "NoMatchingPeftModuleError":
        return f"does not fit the base model (no layer matches its keys: {first_line(exc)})"
    return f"LoRA could not be loaded ({first_line(exc)})"


@contextlib.contextmanager
def quiet_loaders() -> Iterator[None]:
    """Mute the loaders' per-call notices (missing text-encoder keys, load reports); errors still raise."""
    loggers = [logging.getLogger(name) for name in _LOADER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
