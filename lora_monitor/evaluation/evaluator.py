"""Evaluator: generate test images with one LoRA checkpoint, then score them against the references.

The base pipeline is loaded once per run; per checkpoint only the LoRA changes. While consecutive
checkpoints share their LoRA layout (same keys and shapes, the normal case in one training run) the new
weights are copied into the loaded adapter in place (diffusers' hotswap); otherwise the old adapter is
deleted and the new one loaded, so no module or tensor is left behind. Prompts sharing size/steps/CFG are
generated in batched calls of `[eval] batch_size`, each image with its own fixed seed on a CPU generator,
so a checkpoint evaluated live and again with eval-dir gives the same images. Prompt embeddings are
computed once per run, or per checkpoint when the LoRA changes the text encoder.

On a CUDA out-of-memory error the batch is halved, then the pipeline is offloaded to the CPU
(`enable_model_cpu_offload`), then the checkpoint fails with the reason (EvalError).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lora_monitor.checkpoints import coverage, flux_keys
from lora_monitor.checkpoints.files import NotALoraError, lora_format, read_header
from lora_monitor.checkpoints.formats import normalize_lora_state
from lora_monitor.config import SCHEDULERS, EvalConfig
from lora_monitor.errors import EvalError, UserError
from lora_monitor.evaluation.pipelines import adapter_for, family_dtype
from lora_monitor.evaluation.prompts import Prompt
from lora_monitor.families import family_of_keys, family_of_lora, mismatch, pipeline_family

log = logging.getLogger(__name__)

# `memory = auto` keeps the whole pipeline on the GPU when free memory is at least this many times the
# weights: SD1.5 in fp16 (1.99 GiB of weights) peaked at 5.06 GiB evaluating 5 prompts at 512 px on an H100.
FULL_MEMORY_FACTOR = 2.5
_TE_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.")
_LOADER_LOGGERS = ("diffusers", "transformers", "peft")


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
        log.warning("model CPU offload not available: %s", _first_line(exc))
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
    """Load the base pipeline once (fp16 on GPU, bf16 for FLUX, fp32 on CPU) and place it per `[eval] memory`.

    `family` is the run's model family (RunSpec.family; None: SD or SDXL per `sdxl`); for FLUX.1 `parts` holds
    kohya's separate model files (clip_l, t5xxl, ae, tokenizer_cache_dir) used when `base_model` is a file.
    """
    import diffusers

    family = family or ("sdxl" if sdxl else "sd")
    dtype = family_dtype(family, device, device_dtype(device))
    if family == "flux":
        from lora_monitor.evaluation.flux_files import load_flux

        try:
            pipe = load_flux(base_model, parts or {}, dtype)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"FLUX.1 base model {base_model!r} could not be loaded ({_first_line(exc)}); give a diffusers "
                "FLUX.1 folder in [eval] base_model, or kohya's transformer file with --clip_l, --t5xxl and --ae"
            ) from None
        return _ready(pipe, device, memory)
    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    kwargs: dict[str, Any] = {"dtype": dtype}
    if not sdxl:
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
            f"base model {base_model!r} could not be loaded ({_first_line(exc)}); give a diffusers folder or "
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


# ----------------------------------------------------------------------------------------- LoRA files
@dataclass(frozen=True)
class Generated:
    images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]
    swap_s: float = 0.0  # seconds to read the file and swap the LoRA in
    generate_s: float = 0.0  # seconds to generate every image


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _load_lora_state(path: Path, base_family: str | None = None) -> dict[str, torch.Tensor]:
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
        raise EvalError(f"corrupt safetensors file ({_first_line(exc)})") from None
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


def _signature(state: dict[str, torch.Tensor]) -> frozenset[tuple[str, tuple[int, ...]]]:
    return frozenset((k, tuple(v.shape)) for k, v in state.items() if not k.endswith(".alpha"))


def _load_failure(exc: BaseException) -> str:
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if "size mismatch" in line]
    if lines or "shape" in text.lower():
        return f"does not fit the base model (shape mismatch: {(lines or [_first_line(exc)])[0][:300]})"
    if "not found in the base model" in text or type(exc).__name__ == "NoMatchingPeftModuleError":
        return f"does not fit the base model (no layer matches its keys: {_first_line(exc)})"
    return f"LoRA could not be loaded ({_first_line(exc)})"


@contextlib.contextmanager
def _quiet_loaders() -> Iterator[None]:
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


# ------------------------------------------------------------------------------------------ evaluator
GroupKey = tuple[int, int, int, float, str]


class Evaluator:
    """Generates one image per prompt for a checkpoint. Built once; `generate()` per checkpoint.

    Not thread-safe: one thread calls generate(); the pipeline is this object's alone.
    """

    def __init__(self, pipe: Any, prompts: list[Prompt], cfg: EvalConfig, out_root: Path) -> None:
        self.pipe = pipe
        self.prompts = prompts
        self.cfg = cfg
        self.out_root = Path(out_root)
        self.device: torch.device = pipe._execution_device
        self.family = pipeline_family(pipe)  # 'sd', 'sdxl', 'flux': how LoRA names map to its modules
        self.adapter = adapter_for(pipe, self.family)  # what generation does differently per family
        self.adapter.check_scheduler(cfg.scheduler)
        self.batch_size = cfg.batch_size  # halved for the rest of the run after an out-of-memory error
        self._counter = 0
        self._adapter: str | None = None
        self._adapter_sig: frozenset[tuple[str, tuple[int, ...]]] | None = None
        self._te_lora = False  # does the adapter in use change the text encoder (no cached prompt embeddings)
        self._embeds: dict[GroupKey, dict[str, torch.Tensor]] = {}  # base text encoder, once per run
        # Exact copies (on the CPU) of base weights a LoRA was merged into, to put them back bit for bit.
        self._base_copies: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
        set_scheduler(pipe, cfg.scheduler)
        ensure_sdpa(pipe)
        self._offloaded = is_offloaded(pipe)
        if cfg.memory == "offload" and not self._offloaded:
            self._offloaded = enable_offload(pipe, self.device)

    @property
    def memory_mode(self) -> str:
        """'offload' when the models live on the CPU between uses, else 'full'."""
        return "offload" if self._offloaded else "full"

    def seeds(self) -> list[int]:
        """kohya's `--d` seed when given, else the run seed + the prompt's index."""
        return [p.seed if p.seed is not None else self.cfg.seed + i for i, p in enumerate(self.prompts)]

    def _groups(self) -> dict[GroupKey, list[int]]:
        groups: dict[GroupKey, list[int]] = {}
        # cfg.width/height are [eval]'s or else kohya's training resolution (RunSpec.eval_config); only
        # when neither is known does the base model's own size apply. Unset steps/guidance: the family's defaults.
        default_size = self.adapter.default_size()
        steps = self.cfg.steps or self.adapter.default_steps()
        guidance = self.cfg.guidance_scale if self.cfg.guidance_scale is not None else self.adapter.default_guidance()
        for i, p in enumerate(self.prompts):
            key = (
                p.width or self.cfg.width or default_size,
                p.height or self.cfg.height or default_size,
                p.steps or steps,
                p.guidance_scale if p.guidance_scale is not None else guidance,
                self.adapter.negative(p.negative or self.cfg.negative_prompt),
            )
            groups.setdefault(key, []).append(i)
        return groups

    # ------------------------------------------------------------------------------------ LoRA swap
    def generate(self, path: Path) -> Generated:
        """Swap this checkpoint's LoRA in and generate every prompt. Raises EvalError with the reason."""
        started = time.perf_counter()
        state = _load_lora_state(Path(path), self.family)
        self.swap_in(state)
        self._te_lora = touches_text_encoder(list(state))
        return self._generate(1.0, time.perf_counter() - started)

    def at_strength(self, strength: float) -> Generated:
        """The LoRA generate() swapped in, at another scale (`[eval] strengths`): same prompts and seeds."""
        if self._adapter is None:
            raise RuntimeError("at_strength() needs a LoRA swapped in by generate()")
        return self._generate(strength, 0.0)

    def generate_base(self) -> Generated:
        """The base model alone (the run's baseline): no adapter, the exact base weights."""
        self.unload()
        self._te_lora = False
        return self._generate(1.0, 0.0)

    def _generate(self, strength: float, swap_s: float) -> Generated:
        if self._adapter is not None:
            # the scale the merge in _merged() folds in; set every time, a hotswap keeps the last one
            self.pipe.set_adapters([self._adapter], adapter_weights=[strength])
        started = time.perf_counter()
        images = self._generate_with_fallback(self._te_lora)
        return Generated(
            images=images,
            prompts=[p.text for p in self.prompts],
            seeds=self.seeds(),
            swap_s=swap_s,
            generate_s=time.perf_counter() - started,
        )

    def swap_in(self, state: dict[str, torch.Tensor]) -> None:
        """Make `state` (a LoRA state dict) the only active adapter; EvalError if it does not load."""
        sig = _signature(state)
        loadable = dict(state)
        if self.family == "flux" and flux_keys.is_kohya_flux(list(state)):
            loadable = flux_keys.to_diffusers(state)  # diffusers' own converter assumes FLUX.1's full width
        if self._adapter is not None and sig == self._adapter_sig:
            try:
                with _quiet_loaders():
                    self.pipe.load_lora_weights(dict(loadable), adapter_name=self._adapter, hotswap=True)
                return
            except Exception as exc:  # noqa: BLE001 - any failure: fall back to a clean reload
                log.debug("LoRA hotswap failed (%s); reloading", _first_line(exc))
        if note := mismatch(family_of_keys(state), self.family):
            raise EvalError(note)
        self.unload()
        self._counter += 1
        name = f"ckpt{self._counter}"
        try:
            with _quiet_loaders():
                self.pipe.load_lora_weights(loadable, adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - diffusers/peft raise many types for a bad LoRA
            self._drop(name)
            raise EvalError(_load_failure(exc)) from None
        # every module of the file must reach its layers: diffusers skips unmatched ones without an error
        unet = getattr(self.pipe, "unet", None)
        per_block = unet.config.layers_per_block if unet is not None else 2
        per_block = per_block if isinstance(per_block, int) else 2  # a per-level tuple: no SD/SDXL checkpoint
        expected = coverage.expected_targets(state, self.family, per_block)
        missing = coverage.left_over(expected, coverage.adapted_targets(self._components(), name))
        if missing:
            self._drop(name)
            raise EvalError(
                f"does not fit the base model: {len(missing)} of its {len(expected)} LoRA modules reach no layer "
                f"of the base model ({coverage.name_some(missing)}); a LoRA for another architecture?"
            )
        self._adapter, self._adapter_sig = name, sig

    def unload(self) -> None:
        """Delete the loaded adapter. Generation folds it into the weights and restores them from a copy
        afterwards (see `_merged`), so the base weights are what remains."""
        if self._adapter is not None:
            self._drop(self._adapter)
        self._adapter = self._adapter_sig = None

    def _components(self) -> dict[str, torch.nn.Module]:
        """The pipeline's models a LoRA can change, by component name."""
        names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        return {n: m for n in names if isinstance(m := getattr(self.pipe, n, None), torch.nn.Module)}

    def _models(self) -> list[torch.nn.Module]:
        return list(self._components().values())

    def _drop(self, name: str) -> None:
        listed = {n for names in self.pipe.get_list_adapters().values() for n in names}
        if name in listed:
            self.pipe.delete_adapters(name)
        for model in self._models():  # a failed load can leave a config entry behind
            config = getattr(model, "peft_config", None)
            if isinstance(config, dict):
                config.pop(name, None)

    # ----------------------------------------------------------------------------------- generation
    def _embeddings(self, key: GroupKey, indices: list[int], fresh: bool) -> dict[str, torch.Tensor]:
        """Prompt embeddings of a group, rows in `indices` order; cached unless the LoRA changes the TE."""
        if not fresh and key in self._embeds:
            return self._embeds[key]
        embeds = self.adapter.encode([self.prompts[i].text for i in indices], self.device, key[3], key[4])
        if not fresh:
            self._embeds[key] = embeds
        return embeds

    @torch.inference_mode()
    def _run_batches(self, te_lora: bool) -> list[Image.Image]:
        images: list[Image.Image | None] = [None] * len(self.prompts)
        seeds = self.seeds()
        gen_device = "cpu"  # CPU generators: the same seed gives the same noise on any device
        for key, indices in self._groups().items():
            width, height, steps, cfg_scale, _ = key
            embeds = self._embeddings(key, indices, fresh=te_lora)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                out = self.pipe(
                    **{n: t[start : start + len(chunk)] for n, t in embeds.items()},
                    width=width,
                    height=height,
                    num_inference_steps=steps,
                    guidance_scale=cfg_scale,
                    generator=[torch.Generator(gen_device).manual_seed(seeds[i]) for i in chunk],
                    **self.adapter.call_kwargs(),
                )
                for i, image in zip(chunk, out.images, strict=True):
                    images[i] = image
        return [im for im in images if im is not None]

    def _adapter_modules(self) -> list[Any]:
        from peft.tuners.tuners_utils import BaseTunerLayer

        name = self._adapter
        return [
            m
            for model in self._models()
            for m in model.modules()
            if isinstance(m, BaseTunerLayer) and any(name in getattr(m, a, {}) for a in m.adapter_layer_names)
        ]

    @contextlib.contextmanager
    def _merged(self) -> Iterator[None]:
        """Fold the LoRA into the base weights while generating, then put the exact base weights back.

        Merged, each layer does one matmul per step instead of three (measured on the demo's model, one
        CPU thread: 2.66 s -> 1.92 s for 5 images). Restoring from a copy, not peft's unmerge arithmetic,
        keeps the base bit-identical however many checkpoints pass. Skipped under CPU offload, where the
        weights move between devices.
        """
        layers = [] if self._adapter is None or self._offloaded else self._adapter_modules()
        try:
            for layer in layers:
                base = layer.get_base_layer()
                if id(base) not in self._base_copies:
                    self._base_copies[id(base)] = (base, base.weight.detach().to("cpu", copy=True))
                layer.merge(adapter_names=[self._adapter])
            yield
        finally:
            with torch.no_grad():
                for layer in layers:
                    base = layer.get_base_layer()
                    if layer.merged_adapters:
                        base.weight.copy_(self._base_copies[id(base)][1])
                        layer.merged_adapters = []

    def _generate_with_fallback(self, te_lora: bool) -> list[Image.Image]:
        """On CUDA out-of-memory: halve the batch, then offload to CPU, then give up with the reason."""
        while True:
            try:
                with self._merged():
                    return self._run_batches(te_lora)
            except torch.cuda.OutOfMemoryError:
                pass  # leave the except block first, so the traceback's tensors can be freed
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if self.batch_size > 1:
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("evaluation out of memory: retrying with batch size %d", self.batch_size)
            elif not self._offloaded and enable_offload(self.pipe, self.device):
                self._offloaded = True
                log.warning("evaluation out of memory at batch size 1: retrying with model CPU offload")
            else:
                how = "and model CPU offload" if self._offloaded else f"(no offload on {self.device})"
                raise EvalError(f"out of memory even with batch size 1 {how}")

    def save(self, path: Path, step: int | None, generated: Generated) -> Path:
        """Write the images and a manifest under <out_root>/eval/<checkpoint stem>/."""
        from lora_monitor.run_spec import eval_folder

        folder = eval_folder(self.out_root, path)
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
