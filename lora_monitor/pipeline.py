"""The evaluation side of a run, shared by `train` and `eval-dir`: models loaded once, checkpoints
evaluated in a worker thread (generate, save images, score), results handed back as EvalResult events.

An error while evaluating one checkpoint becomes an EvalResult with the reason; it never reaches the
trainer and never stops the run.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lora_monitor.config import Config
from lora_monitor.errors import EvalError, UserError
from lora_monitor.eval_schedule import EvalQueue
from lora_monitor.events import CheckpointReady, EvalResult
from lora_monitor.lora_files import read_header, tensor_fingerprint
from lora_monitor.prompts import Prompt, load_prompts, prompts_from_captions

log = logging.getLogger(__name__)


@dataclass
class Models:
    """Heavy objects, built once per run."""

    evaluator: object
    scorer: object
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Inputs:
    """What evaluation needs from the user, checked before training starts."""

    references: list[Path]
    prompts: list[Prompt]


def check_inputs(config: Config) -> Inputs:
    """Fail fast (before training starts): models available offline, references found, prompts readable."""
    from lora_monitor.metrics import check_model_available

    check_model_available(config.metrics.fashion_clip_model, "fashion_clip")
    check_model_available(config.metrics.visual_model, "visual")
    base = config.base_model()
    if not base:
        raise UserError("no base model: set [eval] base_model or kohya.args.pretrained_model_name_or_path")
    if ("/" in base or os.sep in base) and Path(base).is_absolute() and not Path(base).exists():
        raise UserError(f"base model {base}: not found; fix [eval] base_model or pretrained_model_name_or_path")
    references = reference_images(config)
    return Inputs(references=references, prompts=resolve_prompts(config, references))


def resolve_prompts(config: Config, references: list[Path]) -> list[Prompt]:
    if config.eval.prompts:
        return load_prompts(config.eval.prompts)
    from lora_monitor.references import read_captions

    prompts = prompts_from_captions(read_captions(references))
    if not prompts:
        raise UserError(
            "no prompts: set [eval] prompts to a kohya prompt file, or give the reference images .txt captions"
        )
    return prompts


def quiet_libraries() -> None:
    """Progress bars of diffusers/transformers/hf-hub would garble the live table and the plain log."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def reference_images(config: Config) -> list[Path]:
    """[eval] references, else the image folders kohya trains on (train_data_dir's N_name folders or the
    dataset_config subsets), searched recursively."""
    from lora_monitor.references import find_reference_images

    if config.eval.references is None and config.kohya is not None:
        from lora_monitor.kohya_process import train_data_dirs

        dirs = train_data_dirs(config.kohya)
        if dirs:
            return sorted({p for d in dirs for p in find_reference_images(d)})
    folder = config.references()
    if folder is None:
        raise UserError("no reference images: set [eval] references or kohya.args.train_data_dir")
    return find_reference_images(folder)


def build_models(config: Config, out_root: Path, inputs: Inputs, sdxl: bool = False) -> Models:
    import torch

    quiet_libraries()
    from lora_monitor.evaluator import Evaluator, load_pipeline, resolve_device
    from lora_monitor.metrics import Scorer

    device = resolve_device(config.eval.device)
    if device.type == "cpu" and config.eval.device == "auto":
        # Beside a CPU trainer, half the cores each keeps both near their idle speed.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    scorer = Scorer(
        config.metrics.fashion_clip_model,
        config.metrics.visual_model,
        weights=dict(config.metrics.weights),
        device=str(device),
        cache_dir=config.metrics.cache_dir or out_root / "eval" / ".cache",
    )
    warnings = list(scorer.set_references(inputs.references))
    pipe = load_pipeline(str(config.base_model()), sdxl, device, memory=config.eval.memory)
    warnings += long_prompt_warnings(pipe, inputs.prompts)
    evaluator = Evaluator(pipe, inputs.prompts, config.eval, out_root)
    return Models(evaluator=evaluator, scorer=scorer, warnings=warnings)


def long_prompt_warnings(pipe: object, prompts: list[Prompt]) -> list[str]:
    """The text encoder reads at most model_max_length tokens (77 for CLIP); longer prompts are cut."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None:
        return []
    limit = int(getattr(tokenizer, "model_max_length", 77))
    out = []
    for i, prompt in enumerate(prompts, start=1):
        n = len(tokenizer(prompt.text, truncation=False)["input_ids"])
        if n > limit:
            out.append(f"prompt {i} is {n} tokens; the text encoder reads {limit}, the rest is cut: "
                       f"{prompt.text[:60]!r}...")
    return out


def evaluate_one(models: Models, ready: CheckpointReady, fingerprints: dict[str, tuple[str, dict]]) -> EvalResult:
    """Generate + save + score one checkpoint; every failure becomes an EvalResult.error."""
    started = time.monotonic()
    path = ready.path
    try:
        if not path.exists():
            return EvalResult(path, ready.step, note="deleted before its turn (kohya's save_last_n_*)", skipped=True)
        try:
            fp = tensor_fingerprint(path, read_header(path))
        except (OSError, ValueError) as exc:
            raise EvalError(f"not a readable safetensors file ({exc})") from None
        if fp in fingerprints:
            twin, metrics = fingerprints[fp]
            return EvalResult(path, ready.step, dict(metrics), note=f"same weights as {twin}; not generated again")
        generated = models.evaluator.generate(path)  # type: ignore[attr-defined]
        models.evaluator.save(path, ready.step, generated)  # type: ignore[attr-defined]
        metrics = models.scorer.score(generated.images, generated.prompts)  # type: ignore[attr-defined]
        fingerprints[fp] = (path.name, dict(metrics))
        return EvalResult(path, ready.step, dict(metrics), seconds=time.monotonic() - started)
    except EvalError as exc:
        if not path.exists():
            return EvalResult(path, ready.step, note="deleted while being evaluated", skipped=True)
        return EvalResult(path, ready.step, error=str(exc), seconds=time.monotonic() - started)
    except Exception as exc:  # noqa: BLE001 - evaluation problems never kill the run
        log.debug("evaluation failed", exc_info=True)
        last = traceback.format_exception_only(type(exc), exc)[-1].strip()
        elapsed = time.monotonic() - started
        return EvalResult(path, ready.step, error=f"evaluation failed: {last[:300]}", seconds=elapsed)


class EvalWorker:
    """A thread that evaluates queued checkpoints (newest first while training) and reports results."""

    def __init__(
        self,
        load: Callable[[], Models],
        on_result: Callable[[object], None],
        newest_first: bool = True,
    ) -> None:
        self.queue = EvalQueue(newest_first=newest_first)
        self._load = load
        self._on_result = on_result
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evaluator", daemon=True)
        self.models: Models | None = None
        self.load_error: str | None = None
        self.busy_with: Path | None = None
        self.fingerprints: dict[str, tuple[str, dict]] = {}

    def start(self) -> None:
        self._thread.start()

    def submit(self, ready: CheckpointReady) -> None:
        self.queue.push(ready, ready.step)
        self._wake.set()

    def close(self, timeout: float | None = None, backfill: bool = True) -> list[CheckpointReady]:
        """Finish what is queued (oldest first, as a backfill) then stop; returns what was dropped."""
        dropped: list[CheckpointReady] = []
        if not backfill:
            dropped = self.queue.backfill()
        self.queue.newest_first = False
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout)
        return dropped

    def alive(self) -> bool:
        return self._thread.is_alive()

    def pending(self) -> list[CheckpointReady]:
        return self.queue.pending()

    def _next(self) -> CheckpointReady | None:
        return self.queue.pop()

    def _run(self) -> None:
        try:
            self.models = self._load()
            for w in self.models.warnings:
                self._on_result(("warning", w))
        except UserError as exc:
            self.load_error = str(exc)
            self._on_result(("fatal", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a broken evaluator must not take the trainer down
            self.load_error = f"evaluator could not start: {exc}"
            self._on_result(("fatal", self.load_error))
        while True:
            item = self._next()
            if item is None:
                if self._closing.is_set():
                    return
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            if self.models is None:
                self._on_result(EvalResult(item.path, item.step, error=self.load_error or "evaluator not loaded"))
                continue
            self.busy_with = item.path
            self._on_result(evaluate_one(self.models, item, self.fingerprints))
            self.busy_with = None


def drain(q: queue.Queue, timeout: float) -> list[object]:
    """Everything in q, waiting up to `timeout` for the first item."""
    items = []
    try:
        items.append(q.get(timeout=timeout))
        while True:
            items.append(q.get_nowait())
    except queue.Empty:
        pass
    return items
