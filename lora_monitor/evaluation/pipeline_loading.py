"""The base pipeline, loaded once per run: device and dtype, SD/SDXL/SD3/FLUX pipelines from a folder, a file
or kohya's separate files, attention processors, scheduler, and where it lives in memory (whole on the
device, or CPU offload)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch

from lora_monitor.config import SCHEDULERS
from lora_monitor.errors import UserError
from lora_monitor.evaluation.lora_state import first_line
from lora_monitor.evaluation.pipelines import family_dtype

log = logging.getLogger(__name__)


# The transformer families: a diffusers folder, or the files kohya trains on (module, its loader, the family's name,
# what kohya's files are: for the one-line error)
FILE_LOADERS = {
    "flux": ("flux_files", "load_flux", "FLUX.1", "transformer file with --clip_l, --t5xxl and --ae"),
    "sd3": ("sd3_files", "load_sd3", "SD3", "checkpoint file with the --clip_l, --clip_g, --t5xxl and --vae it lacks"),
    "lumina": ("lumina_files", "load_lumina", "Lumina 2", "NextDiT file with --gemma2 and --ae"),
    "hunyuan_image": ("hunyuan_files", "load_hunyuan", "HunyuanImage 2.1",
                      "DiT file with --text_encoder, --byt5 and --vae"),
    "anima": ("anima_files", "load_anima", "Anima", "DiT file with --qwen3 and --vae"),
}


# `memory = auto` keeps the whole pipeline on the GPU when free memory is at least this many times the
# weights: SD1.5 in fp16 (1.99 GiB of weights) peaked at 5.06 GiB evaluating 5 prompts at 512 px on an H100.
FULL_MEMORY_FACTOR = 2.5


# ------------------------------------------------------------------------------ device, dtype, memory
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"[eval] device = {name!r} but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def pick_dtype(
    device_type: str, capability: tuple[int, int] | None = None, bf16_supported: bool = False
) -> torch.dtype:
    """fp32 on CPU; fp16 on a GPU with fp16 arithmetic (compute capability >= 5.3), else bf16, else fp32."""
    if device_type == "cpu":
        return torch.float32
    if device_type != "cuda" or capability is None or capability >= (5, 3):
        return torch.float16
    return torch.bfloat16 if bf16_supported else torch.float32


def device_dtype(device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return pick_dtype(device.type)
    return pick_dtype("cuda", torch.cuda.get_device_capability(device), torch.cuda.is_bf16_supported())


def choose_memory_mode(memory: str, device_type: str, weights_bytes: int, free_bytes: int | None) -> str:
    """'full' or 'offload' for `[eval] memory` (auto|full|offload); on a CPU there is nothing to offload."""
    if memory not in ("auto", "full", "offload"):
        raise UserError(f"[eval] memory = {memory!r}: use 'auto', 'full' or 'offload'")
    if device_type != "cuda":
        return "full"
    if memory != "auto":
        return memory
    if free_bytes is None:
        return "full"
    return "full" if free_bytes >= FULL_MEMORY_FACTOR * weights_bytes else "offload"


def pipeline_bytes(pipe: Any) -> int:
    """Bytes of the weights (parameters and buffers) of every torch module of the pipeline."""
    total = 0
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            tensors = [*component.parameters(), *component.buffers()]
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def enable_offload(pipe: Any, device: torch.device) -> bool:
    """Switch to `enable_model_cpu_offload` on `device`; False where that is not possible (no GPU)."""
    if device.type != "cuda":
        return False
    try:
        pipe.enable_model_cpu_offload(device=device)
    except (ImportError, RuntimeError, ValueError) as exc:
        log.warning("model CPU offload not available: %s", first_line(exc))
        return False
    return True


def is_offloaded(pipe: Any) -> bool:
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    return pipe._execution_device.type != "cpu" and denoiser.device.type == "cpu"


def ensure_sdpa(pipe: Any) -> int:
    """Replace plain (non-SDPA) attention processors by AttnProcessor2_0; returns how many were replaced.

    Other processor kinds (IP-adapter, added-KV ...) are left alone: they are not plain attention.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    replaced = 0
    for name in ("unet", "vae"):
        model = getattr(pipe, name, None)
        if model is None or not hasattr(model, "attn_processors"):
            continue
        procs = model.attn_processors
        if any(type(p) is AttnProcessor for p in procs.values()):
            new = {k: AttnProcessor2_0() if type(p) is AttnProcessor else p for k, p in procs.items()}
            model.set_attn_processor(new)
            replaced += sum(type(p) is AttnProcessor for p in procs.values())
    return replaced


def load_pipeline(base_model: str, sdxl: bool, device: torch.device, memory: str = "auto", family: str | None = None,
                  parts: dict[str, str] | None = None) -> Any:
    """Load the base pipeline once (fp16 on GPU, bf16 for the transformer families, fp32 on CPU) and place it per
    `[eval] memory`.

    `family` is the run's model family (RunSpec.family; None: SD or SDXL per `sdxl`); for the transformer
    families `parts` holds kohya's separate model files (FILE_LOADERS; run_spec.MODEL_PART_ARGS) used when
    `base_model` is a file.
    """
    import diffusers

    family = family or ("sdxl" if sdxl else "sd")
    dtype = family_dtype(family, device, device_dtype(device))
    if family in FILE_LOADERS:
        module, function, label, files = FILE_LOADERS[family]
        load = getattr(importlib.import_module(f"lora_monitor.evaluation.{module}"), function)
        try:
            pipe = load(base_model, parts or {}, dtype)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{label} base model {base_model!r} could not be loaded ({first_line(exc)}); give a diffusers "
                f"{label} folder in [eval] base_model (`hf download <repo>` fetches a hub one), or kohya's "
                f"{files}"
            ) from None
        return _ready(pipe, device, memory)
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cls is diffusers.StableDiffusionPipeline:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = Path(base_model)
    try:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise UserError(f"{path}: only .safetensors base models are loaded (no pickle); convert it")
            pipe = cls.from_single_file(str(path), **kwargs)
        else:
            pipe = cls.from_pretrained(base_model, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(
            f"base model {base_model!r} could not be loaded ({first_line(exc)}); give a diffusers folder or "
            f"a .safetensors file in [eval] base_model, or download it first with `hf download {base_model}`"
        ) from None
    return _ready(pipe, device, memory)


def _ready(pipe: Any, device: torch.device, memory: str) -> Any:
    pipe.set_progress_bar_config(disable=True)
    ensure_sdpa(pipe)
    place_pipeline(pipe, device, memory)
    return pipe


def place_pipeline(pipe: Any, device: torch.device, memory: str = "auto") -> str:
    """Move a pipeline (still on the CPU) to `device`, or offload it; returns 'full' or 'offload'."""
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    mode = choose_memory_mode(memory, device.type, pipeline_bytes(pipe), free)
    if mode == "offload" and enable_offload(pipe, device):
        log.info("evaluation pipeline offloaded to the CPU (memory = %s)", memory)
        return "offload"
    pipe.to(device)
    return "full"


def set_scheduler(pipe: Any, name: str) -> None:
    if name == "default":
        return
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"[eval] scheduler = {name!r}: use one of default, {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
