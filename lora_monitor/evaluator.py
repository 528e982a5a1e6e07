"""Evaluator: generate test images with one LoRA checkpoint, then score them against the references.

The base pipeline is loaded once per run; per checkpoint only the LoRA is loaded (from safetensors, as a
state dict) and deleted again. Prompts sharing size/steps/CFG are generated in batched calls, each image
with its own fixed seed, so a checkpoint evaluated live and again with eval-dir gives the same images.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lora_monitor.config import EvalConfig
from lora_monitor.errors import EvalError, UserError
from lora_monitor.lora_files import NotALoraError, lora_format, read_header
from lora_monitor.prompts import Prompt

log = logging.getLogger(__name__)

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"[eval] device = {name!r} but no CUDA GPU is visible; use 'auto' or 'cpu'")
    return torch.device(name)


def load_pipeline(base_model: str, sdxl: bool, device: torch.device) -> Any:
    """Load the base pipeline once (fp16 on GPU, fp32 on CPU)."""
    import diffusers

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if not sdxl:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    path = Path(base_model)
    try:
        if path.is_file():
            if path.suffix != ".safetensors":
                raise UserError(f"{path}: only .safetensors base models are loaded (no pickle); convert it first")
            pipe = cls.from_single_file(str(path), **kwargs)
        else:
            pipe = cls.from_pretrained(base_model, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"base model {base_model!r} could not be loaded ({first}); give a diffusers folder or a "
            f".safetensors file in [eval] base_model, or download it first with `hf download {base_model}`"
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def set_scheduler(pipe: Any, name: str) -> None:
    if name == "default":
        return
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"[eval] scheduler = {name!r}: use one of default, {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


@dataclass(frozen=True)
class Generated:
    images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]


def _load_lora_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        header = read_header(path)
    except FileNotFoundError:
        raise EvalError("file deleted before its turn") from None
    except ValueError as exc:
        raise EvalError(f"not a readable safetensors file ({exc})") from None
    try:
        lora_format(header)
    except NotALoraError as exc:
        raise EvalError(f"not a LoRA: {exc}") from None
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise EvalError(f"corrupt safetensors file ({exc})") from None


class Evaluator:
    """Generates one image per prompt for a checkpoint. Built once; `generate()` per checkpoint."""

    def __init__(self, pipe: Any, prompts: list[Prompt], cfg: EvalConfig, out_root: Path) -> None:
        self.pipe = pipe
        self.prompts = prompts
        self.cfg = cfg
        self.out_root = Path(out_root)
        self.device = pipe.device
        self.batch_size = cfg.batch_size
        self._counter = 0
        set_scheduler(pipe, cfg.scheduler)

    def seeds(self) -> list[int]:
        """kohya's `--d` seed when given, else the run seed + the prompt's index."""
        return [p.seed if p.seed is not None else self.cfg.seed + i for i, p in enumerate(self.prompts)]

    def _groups(self) -> dict[tuple[int, int, int, float, str], list[int]]:
        groups: dict[tuple[int, int, int, float, str], list[int]] = {}
        default_size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        for i, p in enumerate(self.prompts):
            key = (
                p.width or self.cfg.width or default_size,
                p.height or self.cfg.height or default_size,
                p.steps or self.cfg.steps,
                p.guidance_scale if p.guidance_scale is not None else self.cfg.guidance_scale,
                p.negative or self.cfg.negative_prompt,
            )
            groups.setdefault(key, []).append(i)
        return groups

    @torch.inference_mode()
    def _run_batches(self) -> list[Image.Image]:
        images: list[Image.Image | None] = [None] * len(self.prompts)
        seeds = self.seeds()
        gen_device = "cpu"  # CPU generators: the same seed gives the same noise on any device
        for (width, height, steps, cfg_scale, negative), indices in self._groups().items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                out = self.pipe(
                    prompt=[self.prompts[i].text for i in chunk],
                    negative_prompt=[negative] * len(chunk) if negative else None,
                    width=width,
                    height=height,
                    num_inference_steps=steps,
                    guidance_scale=cfg_scale,
                    generator=[torch.Generator(gen_device).manual_seed(seeds[i]) for i in chunk],
                )
                for i, image in zip(chunk, out.images, strict=True):
                    images[i] = image
        return [im for im in images if im is not None]

    def generate(self, path: Path) -> Generated:
        """Load the LoRA, generate every prompt, drop the LoRA. Raises EvalError with the reason."""
        state = _load_lora_state(path)
        self._counter += 1
        adapter = f"ckpt{self._counter}"
        try:
            self.pipe.load_lora_weights(state, adapter_name=adapter)
        except (ValueError, RuntimeError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            if "size mismatch" in str(exc) or "shape" in str(exc).lower():
                raise EvalError(f"does not fit the base model (shape mismatch: {msg})") from None
            raise EvalError(f"LoRA could not be loaded ({msg})") from None
        try:
            images = self._generate_with_fallback()
        finally:
            self.pipe.delete_adapters(adapter)
        return Generated(images=images, prompts=[p.text for p in self.prompts], seeds=self.seeds())

    def _generate_with_fallback(self) -> list[Image.Image]:
        """On CUDA out-of-memory: halve the batch, then offload to CPU, then give up with the reason."""
        while True:
            try:
                return self._run_batches()
            except torch.OutOfMemoryError:
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self.batch_size > 1:
                    self.batch_size = max(1, self.batch_size // 2)
                    log.warning("evaluation out of memory: retrying with batch size %d", self.batch_size)
                    continue
                raise EvalError("out of memory even with batch size 1") from None

    def save(self, path: Path, step: int | None, generated: Generated) -> Path:
        """Write the images and a manifest under <out_root>/eval/<checkpoint stem>/."""
        folder = self.out_root / "eval" / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        names = []
        for i, image in enumerate(generated.images):
            name = f"{i:02d}.png"
            tmp = folder / f".{name}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, folder / name)
            names.append(name)
        manifest = {
            "checkpoint": path.name,
            "step": step,
            "prompts": generated.prompts,
            "images": names,
            "seeds": generated.seeds,
            "written": time.time(),
        }
        tmp = folder / ".manifest.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        os.replace(tmp, folder / "manifest.json")
        return folder
