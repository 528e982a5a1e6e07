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

from lora_monitor.checkpoints import coverage, family_keys
from lora_monitor.config import EvalConfig
from lora_monitor.errors import EvalError
from lora_monitor.evaluation.lora_attach import attach, detach, split_by_loader
from lora_monitor.evaluation.lora_state import (
    first_line,
    load_failure,
    load_lora_state,
    lora_signature,
    quiet_loaders,
    touches_text_encoder,
)
from lora_monitor.evaluation.pipeline_loading import enable_offload, ensure_sdpa, is_offloaded, set_scheduler
from lora_monitor.evaluation.pipelines import adapter_for
from lora_monitor.evaluation.prompts import Prompt
from lora_monitor.families import family_of_keys, mismatch, pipeline_family

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generated:
    images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]
    swap_s: float = 0.0  # seconds to read the file and swap the LoRA in
    generate_s: float = 0.0  # seconds to generate every image


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
        # what generation does differently per family
        self.adapter = adapter_for(pipe, self.family, cfg.system_prompt or "")
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
        state = load_lora_state(Path(path), self.family)
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
            self._set_strength(strength)
        started = time.perf_counter()
        images = self._generate_with_fallback(self._te_lora)
        return Generated(
            images=images,
            prompts=[p.text for p in self.prompts],
            seeds=self.seeds(),
            swap_s=swap_s,
            generate_s=time.perf_counter() - started,
        )

    def at_strengths(self, strengths: list[float], batched: bool | None = None) -> dict[float, Generated]:
        """The LoRA generate() swapped in, at each of `strengths`.

        batched: the scales together in the same batched calls (strength_batch.py); None: on a GPU, where
        fuller batches use the device better. On a CPU one merged pass per scale is faster (benchmarks/
        RESULTS.md: 0.87 s per extra scale merged vs 1.24 s batched unmerged on the demo's model). A LoRA that
        changes the text encoder, or running out of memory, also takes one merged pass per scale.
        """
        if self._adapter is None:
            raise RuntimeError("at_strengths() needs a LoRA swapped in by generate()")
        batched = self.device.type == "cuda" if batched is None else batched
        if self._te_lora or len(strengths) < 2 or not batched:
            return {s: self.at_strength(s) for s in strengths}
        started = time.perf_counter()
        try:
            images = self._run_scaled_batches(strengths)
        except torch.cuda.OutOfMemoryError:
            log.warning("evaluation out of memory batching strengths: one pass per strength")
            return {s: self.at_strength(s) for s in strengths}
        each = (time.perf_counter() - started) / len(strengths)
        texts, seeds = [p.text for p in self.prompts], self.seeds()
        return {s: Generated(images=images[s], prompts=texts, seeds=seeds, generate_s=each) for s in strengths}

    @torch.inference_mode()
    def _run_scaled_batches(self, strengths: list[float]) -> dict[float, list[Image.Image]]:
        """Every image at every scale, (image, scale) pairs in batches of batch_size, same seeds as one scale."""
        from lora_monitor.evaluation.strength_batch import per_sample_scales

        out: dict[float, list[Image.Image | None]] = {s: [None] * len(self.prompts) for s in strengths}
        seeds = self.seeds()
        self._set_strength(1.0)
        layers = self._adapter_modules()
        for key, indices in self._groups().items():
            width, height, steps, cfg_scale, _ = key
            embeds = self._embeddings(key, indices, fresh=False)
            jobs = [(row, i, s) for s in strengths for row, i in enumerate(indices)]
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start : start + self.batch_size]
                rows = torch.tensor([row for row, _, _ in chunk])
                with per_sample_scales(layers, self._adapter, [s for _, _, s in chunk]):
                    result = self.pipe(
                        **{n: t[rows.to(t.device)] for n, t in embeds.items()},
                        width=width,
                        height=height,
                        num_inference_steps=steps,
                        **self.adapter.guidance_kwargs(cfg_scale),
                        generator=[torch.Generator("cpu").manual_seed(seeds[i]) for _, i, _ in chunk],
                        **self.adapter.call_kwargs(),
                    )
                for (_, i, s), image in zip(chunk, result.images, strict=True):
                    out[s][i] = image
        return {s: [im for im in images if im is not None] for s, images in out.items()}

    def swap_in(self, state: dict[str, torch.Tensor]) -> None:
        """Make `state` (a LoRA state dict) the only active adapter; EvalError if it does not load."""
        sig = lora_signature(state)
        loadable = family_keys.to_diffusers(self.family, state)  # diffusers' converters: narrow or none
        for_pipe, others = split_by_loader(loadable, self.pipe)  # others: models the pipeline's loader skips
        if self._adapter is not None and sig == self._adapter_sig and not others:
            try:
                with quiet_loaders():
                    self.pipe.load_lora_weights(dict(for_pipe), adapter_name=self._adapter, hotswap=True)
                return
            except Exception as exc:  # noqa: BLE001 - any failure: fall back to a clean reload
                log.debug("LoRA hotswap failed (%s); reloading", first_line(exc))
        if note := mismatch(family_of_keys(state), self.family):
            raise EvalError(note)
        self.unload()
        self._counter += 1
        name = f"ckpt{self._counter}"
        try:
            with quiet_loaders():
                if for_pipe:
                    self.pipe.load_lora_weights(for_pipe, adapter_name=name)
                components = self._components()
                for component, keys in others.items():
                    if component in components:  # else its modules stay unapplied and are named below
                        attach(components[component], keys, name)
        except Exception as exc:  # noqa: BLE001 - diffusers/peft raise many types for a bad LoRA
            self._drop(name)
            raise EvalError(load_failure(exc)) from None
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
        names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "text_conditioner")
        return {n: m for n in names if isinstance(m := getattr(self.pipe, n, None), torch.nn.Module)}

    def _models(self) -> list[torch.nn.Module]:
        return list(self._components().values())

    def _drop(self, name: str) -> None:
        if hasattr(self.pipe, "get_list_adapters"):
            listed = {n for names in self.pipe.get_list_adapters().values() for n in names}
            if name in listed:
                self.pipe.delete_adapters(name)
        for model in self._models():  # what the pipeline's loader does not know of, and a failed load's leftovers
            detach(model, name)

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
                    **self.adapter.guidance_kwargs(cfg_scale),
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

    def _set_strength(self, strength: float) -> None:
        """Scale the adapter's every layer by `strength`, in each model it reached: what diffusers' set_adapters
        does, also for the models its loader does not know of (lora_attach) and for pipelines without one."""
        for layer in self._adapter_modules():
            layer.set_scale(self._adapter, strength)

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
